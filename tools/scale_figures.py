#!/usr/bin/env python
"""Figures for a large run, from the launcher's own command (ALCF/notes/scale.md).

    python tools/scale_figures.py DRY_RUN_OUTPUT --vocab-size V [--fs-gbs 100] [--stream-gbs 2]
    python tools/scale_figures.py --check-checkpoint CKPT/global_step<N>

The first form reads what `DRY_RUN=1 bash train_alcf.sh` printed (world size and trainer command),
runs the trainer's own argument checks on the command at that world size, and prints: the batch
arithmetic (DP, GAS, GBS = MB x GAS x DP, tokens per step, steps, tokens), the parameter count,
the memory per rank by ZeRO stage (megatron/resilience/preflight.py's estimator, accelerator: no CPU-only
attention term), and the checkpoint bytes per rank by ZeRO stage with the write time at an
aggregate file-system bandwidth (`--fs-gbs`, GB/s) and a per-process stream (`--stream-gbs`).
`--vocab-size` is the tokenizer's vocabulary (the command names a tokenizer that may not be here).

The second form checks the checkpoint byte formula against a real checkpoint of this trainer:
each file's size on disk next to the formula's bytes for it.

Checkpoint bytes (AdamW: 2 states; P parameters; w = 2 bytes bf16 / 4 fp32; D = data-parallel ranks):
  ZeRO 0: the model file of rank 0 holds the module (w P) and the optimizer: states 8 P, plus the
          fp32 master 4 P under bf16.
  ZeRO 1/2: rank 0's model file w P; every rank one shard of fp32 master + states, 12 P / D.
  ZeRO 3: every rank a shard of 12 P / D (its model file holds empty placeholders).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GB, GIB = 1e9, 2**30


def checkpoint_bytes(params: int, stage: int, dp: int, half: bool, states: int = 2) -> dict[str, float]:
    """Bytes of one checkpoint (TP = PP = 1): 'model' (rank 0's model file), 'shard' (each rank's
    optimizer shard, 0 at stage 0), 'total', 'largest' (the largest file one process writes)."""
    w = 2 if half else 4
    master = 4 if (half or stage > 0) else 0
    if stage == 0:
        model, shard = params * (w + 4 * states + master), 0.0
    elif stage in (1, 2):
        model, shard = params * w, params * (4 + 4 * states) / dp
    else:
        model, shard = 0.0, params * (4 + 4 * states) / dp
    return {"model": model, "shard": shard, "total": model + shard * (dp if stage else 0),
            "largest": model + shard}


def trainer_args(dry_run_text: str):
    from megatron.arguments import parse_args  # noqa: PLC0415

    world = int(dry_run_text.split("world size ")[1].split()[0])
    body = dry_run_text[dry_run_text.index("# command:\n") + len("# command:\n"):].replace("\\\n", " ")
    words = shlex.split(body)
    argv = words[next(i for i, w in enumerate(words) if w.endswith("pretrain_gpt.py")) + 1:]
    return parse_args(argv, env={"WORLD_SIZE": str(world)}), world


def full_parameters(config, vocab: int) -> int:
    """Parameters of the whole model (no TP or PP split) of a `Config`."""
    from megatron.resilience.preflight import parameters_per_rank  # noqa: PLC0415

    whole = dataclasses.replace(config.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    return parameters_per_rank(config.model, whole, vocab)


def report(path: str, vocab: int, fs_gbs: float, stream_gbs: float) -> None:
    from megatron.config import Config  # noqa: PLC0415
    from megatron.resilience.preflight import estimate_memory  # noqa: PLC0415

    with open(path) as f:
        args, world = trainer_args(f.read())
    dp = args.data_parallel_size
    gas = args.num_micro_batches
    tokens_step = args.global_batch_size * args.seq_length
    print(f"world size {world}: TP {args.tensor_model_parallel_size} x PP {args.pipeline_model_parallel_size} x "
          f"SP {args.ds_sequence_parallel_size} x DP {dp}")
    print(f"GBS = MB {args.micro_batch_size} x GAS {gas} x DP {dp} = {args.micro_batch_size * gas * dp} "
          f"(--global-batch-size {args.global_batch_size})")
    print(f"tokens per step = GBS x seq {args.seq_length} = {tokens_step:,}; steps {args.train_iters:,}; "
          f"samples {args.train_iters * args.global_batch_size:,}; tokens {args.train_iters * tokens_step:,}")
    config = Config.from_args(args)
    p = full_parameters(config, vocab)
    half = bool(args.bf16 or args.fp16)
    tied = "untied" if args.untie_embeddings_and_output_weights else "tied"
    dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    print(f"parameters: {p:,} (vocabulary {vocab:,}, {tied} embeddings); precision {dtype}, optimizer {args.optimizer}")
    print(f"\nmemory per rank (estimate; MB {args.micro_batch_size} x {args.seq_length} tokens, recompute "
          f"{args.recompute_granularity or 'off'}):")
    print(f"{'ZeRO':>5} {'weights':>9} {'grads':>9} {'optim':>9} {'activ':>9} {'total GiB':>10}")
    for stage in range(4):
        est = estimate_memory(config.replace(zero_stage=stage), vocab, cpu=False)
        print(f"{stage:>5} {est.weights / GIB:9.2f} {est.grads / GIB:9.2f} {est.optimizer / GIB:9.2f} "
              f"{est.activations / GIB:9.2f} {est.total / GIB:10.2f}")
    print(f"\ncheckpoint (AdamW; aggregate file system {fs_gbs:g} GB/s, one process {stream_gbs:g} GB/s):")
    print(f"{'ZeRO':>5} {'rank0 GB':>9} {'other GB':>9} {'total GB':>9} {'write s':>8}")
    for stage in range(4):
        b = checkpoint_bytes(p, stage, dp, half)
        seconds = max(b["total"] / (fs_gbs * GB), b["largest"] / (stream_gbs * GB))
        print(f"{stage:>5} {b['largest'] / GB:9.3f} {b['shard'] / GB:9.3f} {b['total'] / GB:9.1f} {seconds:8.1f}")


def check_checkpoint(tag_dir: str) -> None:
    with open(os.path.join(tag_dir, "megatron_args.json")) as f:
        saved = json.load(f)
    from megatron.config import Config  # noqa: PLC0415

    config = Config.from_saved({"kv_channels": None, "add_bias_linear": False, **saved})  # (+ iteration etc.)
    p = full_parameters(config, saved["padded_vocab_size"])
    stage, dp = saved["zero_stage"], saved["data_parallel_size"]
    half = str(saved.get("params_dtype")).replace("torch.", "") in ("bf16", "fp16", "bfloat16", "float16")
    b = checkpoint_bytes(p, stage, dp, half)
    print(f"{tag_dir}: {p:,} parameters, ZeRO {stage}, DP {dp}, {'half' if half else 'fp32'}")
    for path in sorted(glob.glob(os.path.join(tag_dir, "*.pt"))):
        name = os.path.basename(path)
        want = b["shard"] if "optim_states" in name else b["model"]
        size = os.path.getsize(path)
        ratio = f"{size / want:.3f}" if want else "-"
        print(f"  {name:48s} {size:>12,} bytes; formula {want:>12,.0f}; on disk / formula {ratio}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dry_run_output", nargs="?", help="file holding DRY_RUN=1 bash train_alcf.sh's output")
    p.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary size")
    p.add_argument("--fs-gbs", type=float, default=100.0, help="aggregate file-system write bandwidth, GB/s")
    p.add_argument("--stream-gbs", type=float, default=2.0, help="one process's write bandwidth, GB/s")
    p.add_argument("--check-checkpoint", help="a global_step<N> directory: file sizes against the formula")
    a = p.parse_args(argv)
    if a.check_checkpoint:
        check_checkpoint(a.check_checkpoint)
        return 0
    if not a.dry_run_output or not a.vocab_size:
        p.error("give DRY_RUN_OUTPUT and --vocab-size (or --check-checkpoint)")
    report(a.dry_run_output, a.vocab_size, a.fs_gbs, a.stream_gbs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
