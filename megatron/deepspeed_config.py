"""The DeepSpeed config of a run: the launcher's JSON (if any) with the batch, ZeRO, precision and
clipping fields taken from the validated arguments, and ZeRO's buckets sized by the model."""
from __future__ import annotations

import json
import logging

from megatron.fp16 import fp16_block
from megatron.observability.profiling import flops_profiler_config

log = logging.getLogger(__name__)

MIN_BUCKET, MAX_BUCKET = 5_000_000, 500_000_000  # elements; DeepSpeed's default bucket is the maximum


def zero_bucket_sizes(args) -> dict:
    """ZeRO's reduce and all-gather bucket sizes (elements) by model size: an eighth of
    this rank's parameters, at least 5e6, at most DeepSpeed's default 5e8. DeepSpeed's 5e8 exceeds
    every model below 500M parameters, so its gradient bucket grows to the whole model: a full-size
    extra gradient copy per rank (fp32 when bf16 gradients are reduced in fp32). An eighth bounds it
    to 0.5 B/parameter; the floor keeps small models in one bucket (their speed is unchanged).
    Measured (bench/memory.py, 134M parameters, bf16, 2 ranks): peak ZeRO-2 2.61 -> 1.94 GiB,
    ZeRO-3 3.32 -> 2.24 GiB per rank."""
    from megatron.resilience.preflight import parameters_per_rank  # noqa: PLC0415

    if not getattr(args, "hidden_size", None):  # a partial namespace (unit tests of other keys): nothing to size by
        return {}
    vocab = getattr(args, "padded_vocab_size", None) or getattr(args, "vocab_size", None) or 0
    bucket = int(min(MAX_BUCKET, max(MIN_BUCKET, parameters_per_rank(args, vocab) // 8))) // 2 * 2  # even (DeepSpeed)
    return {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}


def build_ds_config(args) -> dict:
    """DeepSpeed config: the launcher's JSON if given, with the batch, ZeRO, dtype and clipping
    fields always taken from the (validated) arguments, so a user's CLI flag wins over the file."""
    cfg: dict = {}
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            cfg = json.load(f)
    wanted = {
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.num_micro_batches,
        "gradient_clipping": args.clip_grad,
    }
    for k, v in wanted.items():
        if k in cfg and cfg[k] != v and args.rank == 0:
            log.warning("DeepSpeed config %s=%s replaced by %s from the arguments", k, cfg[k], v)
        cfg[k] = v
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = args.zero_stage
    if args.data_parallel_size * args.ds_sequence_parallel_size == 1:
        # one rank reduces nothing: contiguous gradients would only copy every gradient into a bucket
        zero.setdefault("contiguous_gradients", False)
    if args.cpu_optimizer:  # --cpu-optimizer (CPU_OPTIMIZER=1 writes the same into the launcher's config)
        zero.setdefault("offload_optimizer", {"device": "cpu"})
    if getattr(args, "overlap_grad_reduce", None):
        zero["overlap_comm"] = True
    if getattr(args, "ddp_bucket_size", None):
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = int(args.ddp_bucket_size)
    for k, v in zero_bucket_sizes(args).items():  # by model size, where neither a flag nor the file sets them
        zero.setdefault(k, v)
    if args.bf16 or args.fp16:
        # Megatron's --accumulate-allreduce-grads-in-fp32, always: the gradients are averaged across ranks
        # and accumulated over micro-batches in fp32 (DeepSpeed's default sums them in bf16/fp16). Stage 0's
        # half-precision optimizer cannot accumulate in fp32: arguments.py refuses it where it would sum.
        cfg["communication_data_type"] = "fp32"
        if args.zero_stage >= 1:
            cfg.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    # upstream's fp16 launch config has "bfloat16": {"enabled": false, "loss_scale": 1.0}; DeepSpeed's bf16
    # block refuses a loss_scale (bf16 has no loss scaling)
    bf16 = {k: v for k, v in cfg.get("bf16", cfg.get("bfloat16", {})).items() if k != "loss_scale"}
    cfg["bf16"] = {**bf16, "enabled": bool(args.bf16)}
    cfg.pop("bfloat16", None)
    cfg["fp16"] = fp16_block(args, cfg.get("fp16", {}))  # --fp16 and the loss-scaling flags (megatron/fp16.py)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("wall_clock_breakdown", False)
    cfg["steps_per_print"] = max(int(cfg.get("steps_per_print", 1)), 10**9)  # we print our own line
    if args.universal_checkpoint:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    profiler = flops_profiler_config(args)  # --flops-profiler-step
    if profiler:
        cfg["flops_profiler"] = profiler
    return cfg
