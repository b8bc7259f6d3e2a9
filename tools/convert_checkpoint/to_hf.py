#!/usr/bin/env python
"""Export a checkpoint of this trainer as a Hugging Face `transformers` Llama directory.

    python tools/convert_checkpoint/to_hf.py --load CKPT [--load-tag global_step<N>] --output OUT_DIR \\
        [--dtype fp32|bf16] [--tokenizer NAME_OR_DIR]

Reads any of: a DeepSpeed ZeRO-1/2/3 checkpoint (the fp32 master weights, merged over all
data-parallel shards; a TP > 1 or PP > 1 checkpoint's tensor-parallel shards and pipeline stages are
merged through a temporary universal checkpoint, ds_to_universal.py; a pipeline checkpoint without
optimizer shards at TP = 1: the layer files' module weights), a universal checkpoint
(`--universal-checkpoint`, or a `*_universal` tag), or
a weights-only checkpoint written by from_hf.py. Writes `config.json` (LlamaConfig),
`model.safetensors`, `generation_config.json`, and the tokenizer files when the checkpoint's
tokenizer is known (HFTokenizer name/dir, or a sentencepiece model), or `--tokenizer`.
The result loads offline with `AutoModelForCausalLM.from_pretrained(OUT_DIR)`.
Only Llama-representable models convert (rmsnorm, SwiGLU, rotary; megatron/model/hf_convert.py).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys

try:  # imported as tools.convert_checkpoint.to_hf
    from tools.convert_checkpoint._cli import run_cli
except ImportError:  # run as a script: this file's directory is sys.path[0]
    from _cli import run_cli

log = logging.getLogger("to_hf")


def _resolve_tag(load: str, tag: str | None, universal: bool) -> str:
    if tag:
        return tag
    for name in (("latest_universal",) if universal else ("latest", "latest_universal")):
        path = os.path.join(load, name)
        if os.path.isfile(path):
            with open(path) as f:
                return f.read().strip()
    raise FileNotFoundError(f"no checkpoint in {load}: no 'latest' file (give --load-tag)")


def _model_states_file(tag_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")) +
                   glob.glob(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_*_model_states.pt")))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no *model_states.pt file (not a checkpoint of this trainer)")
    return files[0]


def saved_args(tag_dir: str) -> dict:
    from megatron.checkpoint.io import torch_load  # noqa: PLC0415  (weights_only=True + allowlist)

    state = torch_load(_model_states_file(tag_dir), map_location="cpu")
    args = state.get("args")
    if not isinstance(args, dict):
        raise ValueError(f"{tag_dir}: the checkpoint holds no 'args' client state (not written by this trainer)")
    return args


def load_fp32_weights(load: str, tag: str) -> dict:
    """Full-precision weights under our parameter names (no 'module.' prefix)."""
    from megatron.checkpoint.io import torch_load  # noqa: PLC0415  (weights_only=True + allowlist)

    tag_dir = os.path.join(load, tag)
    if os.path.isdir(os.path.join(tag_dir, "zero")):  # universal checkpoint: one directory per parameter
        out = {}
        for d in sorted(os.listdir(os.path.join(tag_dir, "zero"))):
            path = os.path.join(tag_dir, "zero", d, "fp32.pt")
            if os.path.isfile(path):
                value = torch_load(path, map_location="cpu")
                out[d] = value["param"] if isinstance(value, dict) else value
        return out
    if glob.glob(os.path.join(tag_dir, "layer_*-model_states.pt")):  # pipeline parallel: one file per layer
        args = saved_args(tag_dir)
        if glob.glob(os.path.join(tag_dir, "*optim_states.pt")):  # the stages' fp32 masters (and TP shards) merged
            return _merged_weights(load, tag)
        if (args.get("tensor_model_parallel_size") or 1) > 1:
            raise ValueError(f"{tag_dir}: a checkpoint with PP > 1 and TP > 1 saved without ZeRO-1 optimizer shards "
                             "(ZeRO stage 0 or --no-save-optim) cannot be merged; resume it at the same layout with "
                             "ZERO_STAGE=1 and save again")
        from megatron.model.gpt_pipeline import read_pipeline_checkpoint  # noqa: PLC0415

        log.info("%s: no optimizer shards; exporting the module weights of the layer files", tag_dir)
        untied = bool(args.get("untie_embeddings_and_output_weights"))
        sd = read_pipeline_checkpoint(tag_dir, args["num_layers"], untied)
        return {k: v.float() for k, v in sd.items()}  # the module weights (bf16 runs: bf16-rounded)
    if (saved_args(tag_dir).get("tensor_model_parallel_size") or 1) > 1:
        return _merged_weights(load, tag)
    if glob.glob(os.path.join(tag_dir, "*optim_states.pt")):
        from megatron.deepspeed_compat.universal import fp32_state_dict_from_zero  # noqa: PLC0415

        # DeepSpeed's merger reads the shards with torch.load(weights_only=False): refuse foreign
        # pickles first (their pickles only are read, against our allowlist)
        from megatron.checkpoint.io import check_pickle_globals  # noqa: PLC0415

        for path in sorted(glob.glob(os.path.join(tag_dir, "*_states.pt"))):
            check_pickle_globals(path)
        sd = fp32_state_dict_from_zero(os.path.join(load, tag))
        return {k: v.float() for k, v in sd.items()}
    state = torch_load(_model_states_file(tag_dir), map_location="cpu")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v.float() for k, v in state["module"].items()}
    masters = (state.get("optimizer") or {}).get("fp32_groups")  # ZeRO stage 0 under bf16: DeepSpeed's fp32 master
    for names, values in zip(state.get("optimizer_param_names") or [], masters or []):
        sd.update({name: value.float() for name, value in zip(names, values)})
    return sd


def _merged_weights(load: str, tag: str) -> dict:
    """A TP > 1 or PP > 1 checkpoint: its shards (one mp_rank_XX per TP rank, per pipeline stage)
    merged by the universal converter (ds_to_universal.py: column-, row- and vocabulary-parallel
    layouts, replicated norms, pipeline stages renamed to GPTModel names) into a temporary universal
    checkpoint, which is then read like any universal checkpoint."""
    import tempfile  # noqa: PLC0415

    try:
        from tools.convert_checkpoint import ds_to_universal  # noqa: PLC0415
    except ImportError:  # run as a script
        import ds_to_universal  # noqa: PLC0415

    tag_dir = os.path.join(load, tag)
    with tempfile.TemporaryDirectory(prefix="to_hf-tp-merge-") as tmp:
        try:
            ds_to_universal.convert(tag_dir, os.path.join(tmp, f"{tag}_universal"))
        except ds_to_universal.ConversionError as e:
            args = saved_args(tag_dir)
            tp, pp = args.get("tensor_model_parallel_size"), args.get("pipeline_model_parallel_size")
            raise ValueError(f"{tag_dir} is a model-parallel checkpoint (TP={tp}, PP={pp}) and its shards cannot "
                             f"be merged: {e}") from e
        return load_fp32_weights(tmp, f"{tag}_universal")


def _save_tokenizer(args: dict, out: str, override: str | None) -> str | None:
    """Tokenizer files next to the model when known; returns what was written (or None)."""
    name = override or args.get("tokenizer_model")
    ttype = args.get("tokenizer_type")
    if not name or (not override and ttype == "NullTokenizer"):
        return None
    try:
        if os.path.isfile(name):  # a sentencepiece model
            shutil.copyfile(name, os.path.join(out, "tokenizer.model"))
            try:
                from transformers import LlamaTokenizer  # noqa: PLC0415

                LlamaTokenizer(vocab_file=name).save_pretrained(out)
            except Exception as e:  # noqa: BLE001 - best effort: the .model file is already there
                log.warning("copied %s as tokenizer.model; transformers could not build a tokenizer from it: %s",
                            name, e)
            return "tokenizer.model"
        from transformers import AutoTokenizer  # noqa: PLC0415

        AutoTokenizer.from_pretrained(name, trust_remote_code=bool(args.get("trust_remote_code"))).save_pretrained(out)
        return name
    except Exception as e:  # noqa: BLE001 - the model is still usable; say what to do
        log.warning("tokenizer %s not exported (%s); copy its files into %s by hand", name, e, out)
        return None


def export(load: str, output: str, *, tag: str | None = None, universal: bool = False, dtype: str = "fp32",
           tokenizer: str | None = None) -> dict:
    """Write the HF directory; returns a small summary."""
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    from megatron.model.hf_convert import hf_config, to_hf_state_dict  # noqa: PLC0415
    from megatron.config import Config  # noqa: PLC0415
    from megatron.training import model_config  # noqa: PLC0415

    tag = _resolve_tag(load, tag, universal)
    tag_dir = os.path.join(load, tag)
    args = saved_args(tag_dir)
    config = model_config(Config.from_saved(args))
    weights = load_fp32_weights(load, tag)
    for name in ("language_model.embedding.word_embeddings.weight", "language_model.output_layer.weight"):
        w = weights.get(name)
        if w is not None and w.shape[0] < config.vocab_size:  # universal checkpoint with stripped padding
            weights[name] = torch.nn.functional.pad(w, (0, 0, 0, config.vocab_size - w.shape[0]))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    hf_sd = to_hf_state_dict(weights, config)
    if not config.untie_embeddings_and_output_weights:
        hf_sd.pop("lm_head.weight", None)  # tied: HF re-ties it on load
    hf_sd = {k: v.detach().to(torch_dtype).contiguous() for k, v in hf_sd.items()}
    cfg = hf_config(config, torch_dtype=dtype if dtype != "fp32" else "float32")
    os.makedirs(output, exist_ok=True)
    cfg.save_pretrained(output)
    save_file(hf_sd, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    tok = _save_tokenizer(args, output, tokenizer)
    with open(os.path.join(output, "megatron_source.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(tag_dir), "iteration": args.get("iteration"),
                   "padded_vocab_size": config.vocab_size, "vocab_size_orig": args.get("vocab_size_orig"),
                   "tokenizer": tok}, f, indent=1)
    return {"tag": tag, "tensors": len(hf_sd), "tokenizer": tok, "vocab_size": config.vocab_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (the one holding 'latest')")
    p.add_argument("--load-tag", default=None, help="tag to export (default: the one 'latest' names)")
    p.add_argument("--universal-checkpoint", action="store_true", help="read 'latest_universal'")
    p.add_argument("--output", required=True, help="HF model directory to write")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or directory to save alongside")
    a = p.parse_args(argv)
    return run_cli(
        lambda: export(a.load, a.output, tag=a.load_tag, universal=a.universal_checkpoint, dtype=a.dtype,
                       tokenizer=a.tokenizer),
        lambda info: f"wrote {a.output}: {info['tensors']} tensors from {info['tag']}, vocab {info['vocab_size']}, "
                     f"tokenizer: {info['tokenizer'] or 'none (add the tokenizer files yourself)'}")


if __name__ == "__main__":
    sys.exit(main())
