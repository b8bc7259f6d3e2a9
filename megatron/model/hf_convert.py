"""Map GPTModel state dicts to / from HF `LlamaForCausalLM` names.

Only the Llama-representable subset converts: rmsnorm, SwiGLU, full RoPE, no learned
position embeddings (anything else raises ValueError). Split or concatenated tensors
(q/k/v, gate/up, fused QKV, fused gate+up) are fresh contiguous copies; all other entries are
the input tensors themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from megatron.model.gpt import GPTConfig

if TYPE_CHECKING:
    import transformers

_LM = "language_model."
_LAYER = _LM + "encoder.layers.{i}."
# (ours relative to layer, HF relative to "model.layers.{i}.") for 1:1 tensors
_LAYER_SAME = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    ("self_attention.dense.weight", "self_attn.o_proj.weight"),
    ("self_attention.dense.bias", "self_attn.o_proj.bias"),
    ("mlp.dense_4h_to_h.weight", "mlp.down_proj.weight"),
    ("mlp.dense_4h_to_h.bias", "mlp.down_proj.bias"),
)


def _check_llama_compatible(config: GPTConfig) -> None:
    problems = []
    if config.normalization != "rmsnorm":
        problems.append("normalization must be rmsnorm")
    if not config.swiglu:
        problems.append("swiglu must be True")
    if not config.use_rotary_position_embeddings:
        problems.append("learned position embeddings are not supported by Llama")
    if config.rotary_percent != 1.0:
        problems.append("rotary_percent < 1 is not supported by HF Llama")
    if config.hidden_size % config.num_attention_heads:
        problems.append("HF LlamaConfig requires hidden_size divisible by num_attention_heads")
    if problems:
        raise ValueError("config is not representable as HF Llama: " + "; ".join(problems))


def hf_config(config: GPTConfig, **overrides: Any) -> "transformers.LlamaConfig":
    """The `transformers.LlamaConfig` equivalent to `config` (extra kwargs override, e.g.
    bos_token_id / eos_token_id / torch_dtype)."""
    _check_llama_compatible(config)
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.kv_channels,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        tie_word_embeddings=not config.untie_embeddings_and_output_weights,
        attention_bias=config.add_bias_linear,
        mlp_bias=config.add_bias_linear,
        attention_dropout=config.attention_dropout,
        initializer_range=config.init_method_std,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept keys with a DeepSpeed 'module.' prefix as well."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def to_hf_state_dict(model_or_sd: nn.Module | dict[str, torch.Tensor], config: GPTConfig
                     ) -> dict[str, torch.Tensor]:
    """Our (upstream Megatron) names -> HF LlamaForCausalLM names. With tied embeddings
    `lm_head.weight` is the embedding tensor itself (as in HF's own state_dict)."""
    _check_llama_compatible(config)
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    sd = _strip_prefix(sd)
    n_kv, d = config.num_key_value_heads, config.kv_channels
    g = config.num_attention_heads // n_kv
    bias = config.add_bias_linear
    emb = sd[_LM + "embedding.word_embeddings.weight"]
    out = {"model.embed_tokens.weight": emb,
           "model.norm.weight": sd[_LM + "encoder.final_layernorm.weight"],
           "lm_head.weight": sd[_LM + "output_layer.weight"]
           if config.untie_embeddings_and_output_weights else emb}
    for i in range(config.num_layers):
        ours, hf = _LAYER.format(i=i), f"model.layers.{i}."
        for a, b in _LAYER_SAME:
            if bias or not a.endswith("bias"):
                out[hf + b] = sd[ours + a]
        for kind in ("weight", "bias") if bias else ("weight",):
            qkv = sd[ours + "self_attention.query_key_value." + kind]
            qkv = qkv.reshape(n_kv, g + 2, d, *qkv.shape[1:])
            rest = qkv.shape[3:]
            parts = (("q_proj", qkv[:, :g]), ("k_proj", qkv[:, g]), ("v_proj", qkv[:, g + 1]))
            for proj, part in parts:
                fresh = part.clone(memory_format=torch.contiguous_format)
                out[hf + "self_attn." + proj + "." + kind] = fresh.view(-1, *rest)
            gate, up = sd[ours + "mlp.dense_h_to_4h." + kind].chunk(2, dim=0)
            out[hf + "mlp.gate_proj." + kind] = gate.clone()
            out[hf + "mlp.up_proj." + kind] = up.clone()
    return out


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], config: GPTConfig
                       ) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM names -> our names (load with GPTModel.load_state_dict(strict=True)).
    Raises KeyError naming the first missing HF tensor."""
    _check_llama_compatible(config)
    n_kv, d = config.num_key_value_heads, config.kv_channels
    g = config.num_attention_heads // n_kv
    bias = config.add_bias_linear
    out = {_LM + "embedding.word_embeddings.weight": hf_sd["model.embed_tokens.weight"],
           _LM + "encoder.final_layernorm.weight": hf_sd["model.norm.weight"]}
    if config.untie_embeddings_and_output_weights:
        out[_LM + "output_layer.weight"] = hf_sd["lm_head.weight"]
    for i in range(config.num_layers):
        ours, hf = _LAYER.format(i=i), f"model.layers.{i}."
        for a, b in _LAYER_SAME:
            if bias or not a.endswith("bias"):
                out[ours + a] = hf_sd[hf + b]
        for kind in ("weight", "bias") if bias else ("weight",):
            q = hf_sd[hf + "self_attn.q_proj." + kind]
            rest = q.shape[1:]
            q = q.reshape(n_kv, g, d, *rest)
            k = hf_sd[hf + "self_attn.k_proj." + kind].reshape(n_kv, 1, d, *rest)
            v = hf_sd[hf + "self_attn.v_proj." + kind].reshape(n_kv, 1, d, *rest)
            out[ours + "self_attention.query_key_value." + kind] = (
                torch.cat((q, k, v), dim=1).reshape(n_kv * (g + 2) * d, *rest))
            out[ours + "mlp.dense_h_to_4h." + kind] = torch.cat(
                (hf_sd[hf + "mlp.gate_proj." + kind], hf_sd[hf + "mlp.up_proj." + kind]), dim=0)
    return out
