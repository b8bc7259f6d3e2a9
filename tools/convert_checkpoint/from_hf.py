#!/usr/bin/env python
"""Import a Hugging Face Llama model as a starting checkpoint of this trainer (CPT from a public model).

    python tools/convert_checkpoint/from_hf.py --hf MODEL_DIR_OR_NAME --output CKPT [--make-vocab-size-divisible-by 128]

Writes `CKPT/global_step0/mp_rank_00_model_states.pt` (weights only, upstream names),
`CKPT/global_step0/megatron_args.json`, `CKPT/latest`, `CKPT/latest_checkpointed_iteration.txt` and
`CKPT/model_flags.txt`: the model flags to train with. Then:

    python pretrain_gpt.py $(cat CKPT/model_flags.txt) --load CKPT --finetune ...   (ZeRO 0, 1 or 2)

Embedding/output rows are zero-padded up to the trainer's padded vocabulary size (a multiple of
--make-vocab-size-divisible-by). The checkpoint has no optimizer state: load it with --finetune.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

try:  # imported as tools.convert_checkpoint.from_hf
    from tools.convert_checkpoint._cli import run_cli
except ImportError:  # run as a script: this file's directory is sys.path[0]
    from _cli import run_cli


def gpt_config_from_hf(cfg, padded_vocab: int):
    """Our GPTConfig for a transformers LlamaConfig (raises ValueError for what Llama-ours can't hold)."""
    from megatron.model import GPTConfig  # noqa: PLC0415

    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (SwiGLU = silu only)")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope type {rope.get('rope_type')!r} is not supported (plain RoPE only)")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    bias = bool(getattr(cfg, "attention_bias", False))
    if bool(getattr(cfg, "mlp_bias", bias)) != bias:
        raise ValueError("attention_bias and mlp_bias differ; this model uses one --add-bias-linear setting")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return GPTConfig(
        vocab_size=padded_vocab, hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size, kv_channels=head_dim,
        max_position_embeddings=cfg.max_position_embeddings, normalization="rmsnorm",
        layernorm_epsilon=cfg.rms_norm_eps, swiglu=True, use_rotary_position_embeddings=True,
        rope_theta=float(theta), untie_embeddings_and_output_weights=not bool(cfg.tie_word_embeddings),
        add_bias_linear=bias)


def model_flags(config, hf_vocab: int, divisible_by: int) -> list[str]:
    flags = ["--num-layers", str(config.num_layers), "--hidden-size", str(config.hidden_size),
             "--num-attention-heads", str(config.num_attention_heads),
             "--num-key-value-heads", str(config.num_key_value_heads),
             "--ffn-hidden-size", str(config.ffn_hidden_size),
             "--max-position-embeddings", str(config.max_position_embeddings),
             "--normalization", "rmsnorm", "--swiglu", "--use-rotary-position-embeddings",
             "--rotary-position-embeddings-theta", repr(config.rope_theta),
             "--layernorm-epsilon", repr(config.layernorm_epsilon),
             "--make-vocab-size-divisible-by", str(divisible_by), "--no-position-embedding"]
    if config.kv_channels != config.hidden_size // config.num_attention_heads:
        flags += ["--kv-channels", str(config.kv_channels)]
    if config.untie_embeddings_and_output_weights:
        flags.append("--untie-embeddings-and-output-weights")
    if not config.add_bias_linear:
        flags.append("--disable-bias-linear")
    return flags


def convert(hf: str, output: str, *, divisible_by: int = 128) -> dict:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from megatron.checkpoint.checkpointing import ARGS_FILE, CHECKPOINT_VERSION, LATEST, TRACKER_FILE, write_atomic  # noqa: PLC0415
    from megatron.model import GPTModel  # noqa: PLC0415
    from megatron.model.hf_convert import from_hf_state_dict  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    cfg = model.config
    hf_vocab = int(cfg.vocab_size)
    padded = -(-hf_vocab // divisible_by) * divisible_by
    config = gpt_config_from_hf(cfg, padded)
    hf_sd = dict(model.state_dict())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in hf_sd and hf_sd[name].shape[0] < padded:
            hf_sd[name] = torch.nn.functional.pad(hf_sd[name], (0, 0, 0, padded - hf_sd[name].shape[0]))
    sd = from_hf_state_dict(hf_sd, config)
    ours = GPTModel(config)
    ours.load_state_dict(sd, strict=True)  # every tensor accounted for, shapes checked
    flags = model_flags(config, hf_vocab, divisible_by)
    tag = "global_step0"
    tag_dir = os.path.join(output, tag)
    os.makedirs(tag_dir, exist_ok=True)
    record = {"num_layers": config.num_layers, "hidden_size": config.hidden_size,
              "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
              "ffn_hidden_size": config.ffn_hidden_size, "swiglu": True, "normalization": "rmsnorm",
              "untie_embeddings_and_output_weights": config.untie_embeddings_and_output_weights,
              "add_bias_linear": config.add_bias_linear, "use_rotary_position_embeddings": True,
              "padded_vocab_size": padded, "vocab_size_orig": hf_vocab, "iteration": 0,
              "optimizer_states_saved": False, "source": hf}
    state = {"module": {"module." + k: v.contiguous() for k, v in ours.state_dict().items()},
             "dp_world_size": 1, "mp_world_size": 1, "global_steps": 0, "global_samples": 0, "skipped_steps": 0,
             "iteration": 0, "tokens": 0, "checkpoint_version": CHECKPOINT_VERSION,
             "args": {**record, "kv_channels": config.kv_channels, "max_position_embeddings":
                      config.max_position_embeddings, "layernorm_epsilon": config.layernorm_epsilon,
                      "rope_theta": config.rope_theta, "model_flags": flags}}
    # DeepSpeed's module loader wants the bare module names
    state["module"] = {k[len("module."):]: v for k, v in state["module"].items()}
    torch.save(state, os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    with open(os.path.join(tag_dir, ARGS_FILE), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(output, "model_flags.txt"), "w") as f:
        f.write(" ".join(flags) + "\n")
    write_atomic(os.path.join(output, LATEST), tag)
    write_atomic(os.path.join(output, TRACKER_FILE), "0")
    return {"tag": tag, "flags": flags, "padded_vocab_size": padded, "hf_vocab_size": hf_vocab}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="HF model directory (or a hub name already in the local cache)")
    p.add_argument("--output", required=True, help="checkpoint directory to write (give it to --load)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary as the trainer will (same flag as pretrain_gpt.py)")
    a = p.parse_args(argv)
    return run_cli(
        lambda: convert(a.hf, a.output, divisible_by=a.make_vocab_size_divisible_by),
        lambda info: f"wrote {a.output}/{info['tag']} (vocab {info['hf_vocab_size']} padded to "
                     f"{info['padded_vocab_size']}).\nTrain from it with:\n  --load {a.output} --finetune "
                     f"{' '.join(info['flags'])}")


if __name__ == "__main__":
    sys.exit(main())
