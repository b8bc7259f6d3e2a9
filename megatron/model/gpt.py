"""Llama-style GPT decoder whose parameter names equal upstream Megatron-DeepSpeed's (spec §9.1).

Fused layouts: `self_attention.query_key_value.weight` is [n_kv * (g + 2) * d, h] with, per KV
group, its g query heads, then k, then v (g = heads / kv_heads); `mlp.dense_h_to_4h.weight` is
[gate; up] for SwiGLU. `language_model.output_layer` is absent when embeddings are tied.
Tensors are [batch, seq, hidden] throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import sequence_parallel as ulysses
from megatron.core import tensor_parallel as tp
from megatron.model import attention_cpu, fused_cross_entropy, fused_norm, fused_swiglu, rotary

_RESIDUAL_PROJECTIONS = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")
Rope = tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin), or None with learned positions


@dataclass
class GPTConfig:
    vocab_size: int  # already padded
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None -> num_attention_heads
    ffn_hidden_size: int | None = None  # None -> swiglu: int(8h/3/64)*64, else 4h
    kv_channels: int | None = None  # None -> hidden_size / num_attention_heads
    max_position_embeddings: int = 4096
    normalization: str = "rmsnorm"  # or "layernorm"
    layernorm_epsilon: float = 1e-5
    swiglu: bool = True  # False -> GELU MLP
    use_rotary_position_embeddings: bool = True  # False -> learned absolute positions
    rope_theta: float = 10000.0
    rotary_percent: float = 1.0
    untie_embeddings_and_output_weights: bool = True
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    word_embedding_init_std: float | None = None  # None -> init_method_std
    init_method_xavier_uniform: bool = False
    apply_residual_scaled_init: bool = True  # output projections: std / sqrt(2L)
    # MuP / CompleteP (megatron/model/mup.py fills these; the defaults are the standard model).
    embedding_multiplier: float = 1.0  # embedding output x this
    output_multiplier: float = 1.0  # final hidden state (so the logits) x this
    attention_scale: float | None = None  # softmax scale; None -> 1/sqrt(kv_channels)
    residual_multiplier: float = 1.0  # every residual branch x this
    init_width_multiplier: float = 1.0  # hidden matrices: init std / sqrt(this)
    residual_init_layers: float | None = None  # L of the output projections' std / sqrt(2L); None -> num_layers
    # Parallelism and memory (the TP size comes from megatron.core.parallel_state).
    sequence_parallel: bool = False  # Megatron SP: norms/dropout on sequence shards (TP > 1)
    recompute_granularity: str | None = None  # None | "full" (whole layers) | "selective" (attention core)
    recompute_num_layers: int = 1  # "full": layers per checkpointed chunk

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "max_position_embeddings"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        heads = self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = heads
        check(self.num_key_value_heads > 0 and heads % self.num_key_value_heads == 0,
              f"num_attention_heads ({heads}) must be divisible by num_key_value_heads "
              f"({self.num_key_value_heads})")
        if self.kv_channels is None:
            check(self.hidden_size % heads == 0, f"hidden_size ({self.hidden_size}) must be "
                  f"divisible by num_attention_heads ({heads}) unless kv_channels is given")
            self.kv_channels = self.hidden_size // heads
        if self.ffn_hidden_size is None:  # upstream rule (spec §3.7)
            h = self.hidden_size
            self.ffn_hidden_size = int(8 * h / 3 / 64) * 64 if self.swiglu else 4 * h
        check(self.kv_channels > 0 and self.ffn_hidden_size > 0,
              f"kv_channels ({self.kv_channels}) and ffn_hidden_size ({self.ffn_hidden_size}) "
              "must be positive")
        check(self.normalization in ("rmsnorm", "layernorm"),
              f"normalization must be 'rmsnorm' or 'layernorm', got {self.normalization!r}")
        check(0.0 < self.rotary_percent <= 1.0,
              f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        r = self.rotary_dim
        check(not self.use_rotary_position_embeddings or (r > 0 and r % 2 == 0),
              f"rotary dims int(kv_channels * rotary_percent) = {r} must be even and > 0")
        for name in ("hidden_dropout", "attention_dropout"):
            p = getattr(self, name)
            check(0.0 <= p < 1.0, f"{name} must be in [0, 1), got {p}")
        check(self.init_method_std >= 0 and (self.word_embedding_init_std or 0.0) >= 0,
              "init stds must be non-negative")
        check(self.recompute_granularity in (None, "full", "selective") and self.recompute_num_layers > 0,
              f"recompute_granularity must be None, 'full' or 'selective' (got {self.recompute_granularity!r}) "
              f"and recompute_num_layers > 0 (got {self.recompute_num_layers})")

    @property
    def rotary_dim(self) -> int:
        """Leading head dims that RoPE rotates (upstream: int(kv_channels * rotary_percent))."""
        return int(self.kv_channels * self.rotary_percent)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Closed-form parameter count (no model needed). `exclude_embeddings` drops the word and
        position embeddings and the untied output layer."""
        h, d, f = self.hidden_size, self.kv_channels, self.ffn_hidden_size
        bias = int(self.add_bias_linear)
        norm = h * (2 if self.normalization == "layernorm" else 1)
        qkv_out = (self.num_attention_heads + 2 * self.num_key_value_heads) * d
        mlp_in = f * (2 if self.swiglu else 1)
        layer = (2 * norm + (h + bias) * qkv_out + (self.num_attention_heads * d + bias) * h
                 + (h + bias) * mlp_in + (f + bias) * h)
        total = self.num_layers * layer + norm
        if not exclude_embeddings:
            total += self.vocab_size * h
            total += 0 if self.use_rotary_position_embeddings else self.max_position_embeddings * h
            total += self.vocab_size * h if self.untie_embeddings_and_output_weights else 0
        return total


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight (as HF Llama)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_norm.use_fused():  # same arithmetic, fewer passes (megatron/model/fused_norm.py)
            return fused_norm.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _norm(config: GPTConfig) -> nn.Module:
    if config.normalization == "rmsnorm":
        return RMSNorm(config.hidden_size, config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_pos, rotary_dim] (rotate-half layout), computed once in float32."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.rotary_dim, self.theta = config.rotary_dim, config.rope_theta
        self.max_positions = config.max_position_embeddings
        shape = (self.max_positions, self.rotary_dim)
        self.register_buffer("cos", torch.empty(shape), persistent=False)
        self.register_buffer("sin", torch.empty(shape), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        dim = self.rotary_dim
        inv_freq = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos.copy_(emb.cos())  # copy_ keeps the buffers' device and dtype
        self.sin.copy_(emb.sin())

    def forward(self, seq_len: int, position_ids: torch.Tensor | None) -> Rope:
        """Returns cos, sin shaped [s, 1, r] or [b, s, 1, r] (broadcast over heads)."""
        if position_ids is None:
            return self.cos[:seq_len, None, :], self.sin[:seq_len, None, :]
        return self.cos[position_ids].unsqueeze(-2), self.sin[position_ids].unsqueeze(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dims of x [b, s, heads, d]; the rest pass."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = x_rot * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def sdpa_fuses_gqa(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether SDPA's `enable_gqa=True` reaches a fused kernel for `q` [b, heads, s, d]: torch >= 2.5 (no such argument
    before); on CUDA only flash takes it (fp16/bf16, no mask, d <= 256), on XPU torch >= 2.8. Elsewhere torch would
    run its math kernel (the [b, heads, s, s] scores in memory), so the caller expands K/V to every query head."""
    if torch.torch_version.TorchVersion(torch.__version__) < "2.5.0a0":
        return False
    if q.device.type == "cuda":
        return mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
    if q.device.type == "xpu":
        return torch.torch_version.TorchVersion(torch.__version__) >= "2.8.0a0"
    return True


class Attention(nn.Module):
    """Tensor parallel: QKV is column-parallel (the group-major fused layout cut in contiguous
    pieces gives each rank whole KV groups with their query heads), `dense` row-parallel."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        n_heads, n_kv, world = config.num_attention_heads, config.num_key_value_heads, tp.world_size()
        if n_kv % world:
            raise ValueError(f"num_key_value_heads ({n_kv}) must be divisible by the tensor-parallel size ({world})")
        self.n_heads, self.n_kv = n_heads // world, n_kv // world  # this rank's heads
        self.d, self.group = config.kv_channels, n_heads // n_kv
        self.dropout, h, bias = config.attention_dropout, config.hidden_size, config.add_bias_linear
        self.selective_recompute = config.recompute_granularity == "selective"
        self.scale = config.attention_scale  # None -> 1/sqrt(d); MuP: alpha/d
        self.query_key_value = tp.ColumnParallelLinear(h, (n_heads + 2 * n_kv) * self.d, bias=bias,
                                                       sequence_parallel=config.sequence_parallel)
        self.dense = tp.RowParallelLinear(n_heads * self.d, h, bias=bias, sequence_parallel=config.sequence_parallel)
        # Ulysses SP > 1: all-to-all to the whole sequence on heads/SP heads around `attend` (None at SP = 1)
        self.ulysses = ulysses.ulysses_attention(self.attend, self.n_heads, self.n_kv)

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention; `mask` (bool [b, 1, s, s], True = may attend) replaces the causal mask
        (--reset-attention-mask: causal within each document)."""
        dropout = self.dropout if self.training else 0.0
        with tp.model_parallel_rng(dropout > 0):  # heads differ across TP ranks (and Ulysses SP ranks): so do masks
            if attention_cpu.use_explicit(q, k):  # bf16 on CPU: faster than the fused kernel (see the module)
                return attention_cpu.attention(q, k, v, mask, scale=self.scale, dropout=dropout)
            grouped = self.group > 1 and sdpa_fuses_gqa(q, mask)
            if self.group > 1 and not grouped:  # each query head gets its KV head, as torch's math kernel does
                k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                                  scale=self.scale, **({"enable_gqa": True} if grouped else {}))

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None = None) -> torch.Tensor:
        g = self.group
        qkv = self.query_key_value(x)  # [b, s, ...]: the whole sequence under sequence parallelism
        b, s, _ = qkv.shape
        if rope is not None and rotary.use_fused():  # same arithmetic, fewer passes (megatron/model/rotary.py)
            q, k, v = rotary.qkv_rotary(qkv, self.n_kv, g, self.d, *rope)
        else:
            qkv = qkv.view(b, s, self.n_kv, g + 2, self.d)
            q = qkv[:, :, :, :g].reshape(b, s, self.n_heads, self.d)  # head i uses kv group i // g
            k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = self.ulysses(q, k, v) if self.ulysses is not None else self.attend(q, k, v, mask)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.n_heads * self.d))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.selective_recompute and torch.is_grad_enabled():
            return tp.checkpoint(self.core_attention, q, k, v, mask)
        return self.core_attention(q, k, v, mask)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu, h, f = config.swiglu, config.hidden_size, config.ffn_hidden_size
        bias = config.add_bias_linear
        # SwiGLU: one fused [gate; up] projection; under TP each rank holds [gate_r; up_r] (stride 2)
        sp = config.sequence_parallel
        self.dense_h_to_4h = tp.ColumnParallelLinear(h, 2 * f if self.swiglu else f, bias=bias,
                                                     sequence_parallel=sp, stride=2 if self.swiglu else 1)
        self.dense_4h_to_h = tp.RowParallelLinear(f, h, bias=bias, sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense_h_to_4h(x)
        if self.swiglu and fused_swiglu.use_fused():  # same arithmetic, one pass fewer (megatron/model/fused_swiglu.py)
            return self.dense_4h_to_h(fused_swiglu.swiglu(x))
        if self.swiglu:
            gate, up = x.chunk(2, dim=-1)
            return self.dense_4h_to_h(F.silu(gate) * up)
        return self.dense_4h_to_h(F.gelu(x))


class TransformerLayer(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attention = Attention(config)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.sequence_parallel = config.sequence_parallel
        self.sequence_sharded = config.sequence_parallel or ulysses.world_size() > 1  # Megatron SP or Ulysses
        self.residual_multiplier = config.residual_multiplier

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # Replicated activations keep the default generator (same mask on every TP rank);
        # sequence shards (Megatron SP over TP ranks, Ulysses SP) draw per-rank masks.
        with tp.model_parallel_rng(self.sequence_sharded and self.training and self.dropout.p > 0):
            return self.dropout(x)

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None = None) -> torch.Tensor:
        r = self.residual_multiplier  # CompleteP: (L / L_base)^-alpha; 1 otherwise
        x = torch.add(x, self._dropout(self.self_attention(self.input_layernorm(x), rope, mask)), alpha=r)
        return torch.add(x, self._dropout(self.mlp(self.post_attention_layernorm(x))), alpha=r)


class Encoder(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.final_layernorm = _norm(config)
        self.recompute_chunk = config.recompute_num_layers if config.recompute_granularity == "full" else 0

    def _run(self, start: int, end: int, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers[start:end]:
            x = layer(x, rope, mask)
        return x

    def forward(self, x: torch.Tensor, rope: Rope, mask: torch.Tensor | None = None) -> torch.Tensor:
        n = len(self.layers)
        if self.recompute_chunk and torch.is_grad_enabled():  # full recompute, chunks of layers
            for start in range(0, n, self.recompute_chunk):
                x = tp.checkpoint(self._run, start, min(start + self.recompute_chunk, n), x, rope, mask)
        else:
            x = self._run(0, n, x, rope, mask)
        return self.final_layernorm(x)


class Embedding(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = tp.VocabParallelEmbedding(config.vocab_size, h)
        if not config.use_rotary_position_embeddings:
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.sequence_parallel = config.sequence_parallel and tp.world_size() > 1
        self.sequence_sharded = self.sequence_parallel or ulysses.world_size() > 1  # tokens arrive sharded (Ulysses)
        self.multiplier = config.embedding_multiplier

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.word_embeddings(tokens)
        if hasattr(self, "position_embeddings"):
            if position_ids is None:
                position_ids = torch.arange(tokens.shape[1], device=tokens.device)
            x = x + self.position_embeddings(position_ids)
        if self.multiplier != 1.0:  # MuP input alpha
            x = x * self.multiplier
        if self.sequence_parallel:  # the layers run on this rank's sequence shard
            x = tp.scatter_to_sequence_parallel_region(x)
        with tp.model_parallel_rng(self.sequence_sharded and self.training and self.embedding_dropout.p > 0):
            return self.embedding_dropout(x)


class LanguageModel(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.embedding = Embedding(config)
        use_rope = config.use_rotary_position_embeddings
        self.rotary_pos_emb = RotaryEmbedding(config) if use_rope else None
        self.encoder = Encoder(config)
        self.sequence_parallel = config.sequence_parallel
        self.output_multiplier = config.output_multiplier
        if config.untie_embeddings_and_output_weights:
            self.output_layer = tp.ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False,
                                                        sequence_parallel=config.sequence_parallel)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of this rank's vocabulary slice [b, s, V/TP] (all of them with TP = 1); with
        `labels`, where the fused output layer + cross-entropy applies, the per-token loss instead."""
        if position_ids is None:  # Ulysses SP > 1: the global positions of this rank's shard (None at SP = 1)
            position_ids = ulysses.shard_position_ids(tokens.shape[1], tokens.device)
        rope = self.rotary_pos_emb(tokens.shape[1], position_ids) if self.rotary_pos_emb else None
        x = self.encoder(self.embedding(tokens, position_ids), rope, attention_mask)
        if self.output_multiplier != 1.0:  # MuP: alpha_out / m_N on the logits (applied before the head)
            x = x * self.output_multiplier
        head = getattr(self, "output_layer", None)
        if labels is not None and self.fused_loss(x):  # megatron/model/fused_cross_entropy.py
            return fused_cross_entropy.output_cross_entropy(
                x, head.weight if head is not None else self.embedding.word_embeddings.weight, labels)
        if head is not None:
            return head(x)
        return tp.parallel_lm_logits(x, self.embedding.word_embeddings.weight, self.sequence_parallel)

    @staticmethod
    def fused_loss(x: torch.Tensor) -> bool:
        return tp.world_size() == 1 and fused_cross_entropy.use_fused(x)


class GPTModel(nn.Module):
    """Decoder-only LM. forward(tokens) -> logits [b, s, V]; with labels -> per-token float32
    cross-entropy [b, s] (labels are already shifted; label -100 gives loss 0)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config)
        self.init_weights()
        if config.sequence_parallel:  # norms and row-parallel biases see a sequence shard
            tp.register_sequence_parallel_grad_hooks(self, skip=("position_embeddings.weight",))

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attention_mask`: bool [b, 1, s, s] (True = may attend) instead of the causal mask."""
        seq_len = tokens.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        out = self.language_model(tokens, position_ids, attention_mask, labels)  # this TP rank's vocabulary slice
        if labels is None:
            return tp.gather_from_tensor_model_parallel_region(out)
        if out.shape == labels.shape:  # the fused output layer + loss already gave the per-token loss
            return out
        return tp.vocab_parallel_cross_entropy(out, labels)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re-)initialize every parameter as upstream does (spec §7). With `seed`, a private
        generator on the parameters' device is used (global RNG untouched; same seed and device
        give the same weights); without, the global RNG. Tensor-parallel shards are cut from
        the full-size draw, so the weights do not depend on the TP size."""
        cfg = self.config
        std = cfg.init_method_std
        hidden_std = std / math.sqrt(cfg.init_width_multiplier)  # MuP: sigma / sqrt(m_N) for hidden matrices
        depth = cfg.residual_init_layers or cfg.num_layers
        scaled_std = hidden_std / math.sqrt(2 * depth) if cfg.apply_residual_scaled_init else hidden_std
        gen = None
        if seed is not None:
            gen = torch.Generator(device=next(self.parameters()).device).manual_seed(seed)
        for name, p in self.named_parameters():  # tied weights appear once
            if name.endswith("bias"):
                p.zero_()
            elif name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("word_embeddings.weight"):
                wstd = std if cfg.word_embedding_init_std is None else cfg.word_embedding_init_std
                tp.init_partitioned(p, nn.init.normal_, 0.0, wstd, generator=gen)
            elif name.endswith("position_embeddings.weight"):
                nn.init.normal_(p, 0.0, std, generator=gen)
            elif cfg.init_method_xavier_uniform:
                tp.init_partitioned(p, nn.init.xavier_uniform_, generator=gen)
            elif name.endswith(_RESIDUAL_PROJECTIONS):
                tp.init_partitioned(p, nn.init.normal_, 0.0, scaled_std, generator=gen)
            elif name.endswith("output_layer.weight"):
                tp.init_partitioned(p, nn.init.normal_, 0.0, std, generator=gen)
            else:
                tp.init_partitioned(p, nn.init.normal_, 0.0, hidden_std, generator=gen)
        if self.language_model.rotary_pos_emb is not None:
            self.language_model.rotary_pos_emb.reset_tables()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters on this rank (tied weights counted once; a TP rank holds
        only its shards: `config.num_parameters()` is the whole model); `exclude_embeddings` drops
        word/position embeddings and the untied output layer."""
        emb = ("word_embeddings.weight", "position_embeddings.weight", "output_layer.weight")
        return sum(p.numel() for n, p in self.named_parameters()
                   if not (exclude_embeddings and n.endswith(emb)))
