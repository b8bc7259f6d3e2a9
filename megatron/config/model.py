"""Model and precision sections of the configuration (megatron/config/__init__.py has the tree)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.config.base import Section, positive


@dataclass(frozen=True)
class ModelConfig(Section):
    """Shape of the Llama-style GPT, its initialization and MuP / CompleteP (megatron/model/)."""
    num_layers: int | None = None
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    kv_channels: int | None = None
    max_position_embeddings: int | None = None
    seq_length: int | None = None
    use_rotary_position_embeddings: bool = False
    rope_theta: float = 10000.0
    rotary_percent: float = 1.0
    add_position_embedding: bool = True
    normalization: str = 'layernorm'
    layernorm_epsilon: float = 1e-05
    apply_layernorm_1p: bool = False
    swiglu: bool = False
    squared_relu: bool = False
    openai_gelu: bool = False
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    embedding_weights_in_fp32: bool = False
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = False
    make_vocab_size_divisible_by: int = 128
    use_flash_attn_v1: bool = False
    use_flash_attn_v2: bool = False
    use_flash_attn_triton: bool = False
    use_flash_attn_builder: bool = False
    no_bias_gelu_fusion: bool = False
    no_bias_dropout_fusion: bool = False
    no_masked_softmax_fusion: bool = False
    no_gradient_accumulation_fusion: bool = False
    no_persist_layer_norm: bool = False
    seed: int = 1234
    data_parallel_random_init: bool = False
    init_method_std: float = 0.02
    adjust_word_embedding_init: bool = False
    word_embedding_init_std: float = 0.02
    init_method_xavier_uniform: bool = False
    no_initialization: bool = False
    enable_mup: bool = False
    mup_base_width: int | None = None
    mup_width_multiplier: float | None = None
    mup_input_alpha: float = 1.0
    mup_output_alpha: float = 1.0
    mup_attn_alpha: float = 1.0
    enable_depth_scale: bool = False
    depth_base: int | None = None
    depth_multiplier: float | None = None
    depth_alpha: float = 1.0

    def validate(self) -> list[str]:
        errs = [f"--{name.replace('_', '-')} is required"
                for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
                if getattr(self, name) is None]
        errs += positive(self, "num_layers", "hidden_size", "num_attention_heads", "seq_length")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads and self.hidden_size and self.kv_channels is None and self.hidden_size % heads:
            errs.append(f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads ({heads})")
        if heads and kv_heads and heads % kv_heads:
            errs.append(f"--num-attention-heads ({heads}) must be divisible by --num-key-value-heads ({kv_heads})")
        if self.seq_length and self.max_position_embeddings and self.max_position_embeddings < self.seq_length:
            errs.append(f"--max-position-embeddings ({self.max_position_embeddings}) must be >= --seq-length "
                        f"({self.seq_length})")
        if not 0.0 < self.rotary_percent <= 1.0:
            errs.append(f"--rotary-percent must be in (0, 1] (got {self.rotary_percent})")
        if not self.add_position_embedding and not self.use_rotary_position_embeddings:
            errs.append("--no-position-embedding without --use-rotary-position-embeddings (a model without position "
                        "information) is not supported; add --use-rotary-position-embeddings or drop the flag")
        # Upstream flags whose behaviour is not implemented here yet: refuse rather than ignore.
        for bad, what in ((self.squared_relu, "--squared-relu"), (self.apply_layernorm_1p, "--apply-layernorm-1p")):
            if bad:
                errs.append(f"{what} is not supported by this version yet; remove the flag")
        return errs + self.mup_problems()

    def mup_problems(self) -> list[str]:
        """Configuration problems of the MuP / CompleteP flags, one line each naming the fix."""
        errs: list[str] = []
        base, mult = self.mup_base_width, self.mup_width_multiplier
        if self.enable_mup:
            if base is None and mult is None:
                errs.append("--enable-mup needs --mup-base-width (the hidden size the hyper-parameters were tuned at; "
                            "MUP_BASE_WIDTH in the launcher) or --mup-width-multiplier")
            elif base is not None and mult is not None:
                errs.append("give either --mup-base-width or --mup-width-multiplier, not both")
            elif base is not None and not base > 0:
                errs.append(f"--mup-base-width must be > 0 (got {base})")
            elif mult is not None and not (mult > 0 and math.isfinite(mult)):
                errs.append(f"--mup-width-multiplier must be > 0 (got {mult})")
            for name in ("mup_input_alpha", "mup_output_alpha", "mup_attn_alpha"):
                v = getattr(self, name)
                if not (v > 0 and math.isfinite(v)):
                    errs.append(f"--{name.replace('_', '-')} must be > 0 (got {v})")
            if self.init_method_xavier_uniform:
                errs.append("--enable-mup sets the init std of each layer; drop --init-method-xavier-uniform")
        elif base is not None or mult is not None:
            errs.append("--mup-base-width/--mup-width-multiplier have no effect without --enable-mup: add --enable-mup")
        dbase, dmult = self.depth_base, self.depth_multiplier
        if self.enable_depth_scale:
            if dbase is None and dmult is None:
                errs.append("--enable-depth-scale needs --depth-base (the number of layers the hyper-parameters were "
                            "tuned at; DEPTH_BASE in the launcher) or --depth-multiplier")
            elif dbase is not None and dmult is not None:
                errs.append("give either --depth-base or --depth-multiplier, not both")
            elif dbase is not None and not dbase > 0:
                errs.append(f"--depth-base must be > 0 (got {dbase})")
            elif dmult is not None and not (dmult > 0 and math.isfinite(dmult)):
                errs.append(f"--depth-multiplier must be > 0 (got {dmult})")
            alpha = self.depth_alpha
            if not 0.0 <= alpha <= 1.0:
                errs.append(f"--depth-alpha must be in [0, 1] (got {alpha}); CompleteP uses 1, Yang et al. 0.5")
        elif dbase is not None or dmult is not None:
            errs.append("--depth-base/--depth-multiplier have no effect without --enable-depth-scale: "
                        "add --enable-depth-scale")
        return errs


@dataclass(frozen=True)
class PrecisionConfig(Section):
    """Training dtype and fp16 loss scaling (megatron/fp16.py checks the scaler flags)."""
    fp16: bool = False
    bf16: bool = False
    loss_scale: float | None = None
    initial_loss_scale: float | None = None
    min_loss_scale: float | None = None
    loss_scale_window: float | None = None
    hysteresis: int | None = None
    accumulate_allreduce_grads_in_fp32: bool = False
    grad_accum_dtype: str = "fp32"  # gradients kept, accumulated and reduced in: fp32, or the 16-bit weights' dtype

    def validate(self) -> list[str]:
        errs = ["--fp16 and --bf16 are mutually exclusive"] if self.fp16 and self.bf16 else []
        weights = "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"
        if self.grad_accum_dtype != "fp32" and self.grad_accum_dtype != weights:
            errs.append(f"--grad-accum-dtype {self.grad_accum_dtype} needs --{self.grad_accum_dtype} weights (the "
                        f"gradients are kept in the weights' dtype; these are {weights}): add "
                        f"--{self.grad_accum_dtype} or use --grad-accum-dtype fp32")
        if self.grad_accum_dtype != "fp32" and self.accumulate_allreduce_grads_in_fp32:
            errs.append(f"--grad-accum-dtype {self.grad_accum_dtype} contradicts --accumulate-allreduce-grads-in-fp32: "
                        "drop one of them (the launcher passes the latter unless GRAD_ACCUM_DTYPE is set)")
        return errs
