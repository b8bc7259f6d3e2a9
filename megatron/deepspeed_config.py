"""The DeepSpeed config of a run, built here only.

* `launch_config`: the JSON file train_alcf.sh writes (`ds-configs/ds_stage{Z}_mb{MB}_gb{GB}_pp{PP}_{DTYPE}.json`)
  from the launcher's trainer flags, through this module's command line (no torch import: it runs before
  any Python environment is set up, e.g. under DRY_RUN=1):

      python -m megatron.deepspeed_config [--write PATH] [launcher options] <the launcher's trainer flags>

* `build_ds_config`: what the trainer gives DeepSpeed: that file (or the user's own --deepspeed_config,
  or nothing) with the batch, ZeRO, precision and clipping fields taken from the validated arguments,
  and ZeRO's buckets sized by the model.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from megatron.config import Config
from megatron.fp16 import DS_DEFAULTS, fp16_block

log = logging.getLogger(__name__)

MIN_BUCKET, MAX_BUCKET = 5_000_000, 500_000_000  # elements; DeepSpeed's default bucket is the maximum


def model_parameters_per_rank(config: Config) -> int:
    """The model's parameters on this rank before ZeRO partitions them (TP and PP split them)."""
    from megatron.resilience.preflight import parameters_per_rank  # noqa: PLC0415

    vocab = config.runtime.padded_vocab_size or config.data.vocab_size or 0
    return parameters_per_rank(config.model, config.parallel, vocab)


def zero_bucket_sizes(config: Config) -> dict:
    """ZeRO's reduce and all-gather bucket sizes (elements) by model size: an eighth of
    this rank's parameters, at least 5e6, at most DeepSpeed's default 5e8. DeepSpeed's 5e8 exceeds
    every model below 500M parameters, so its gradient bucket grows to the whole model: a full-size
    extra gradient copy per rank (fp32 when bf16 gradients are reduced in fp32). An eighth bounds it
    to 0.5 B/parameter; the floor keeps small models in one bucket (their speed is unchanged).
    Measured (bench/memory.py, 134M parameters, bf16, 2 ranks): peak ZeRO-2 2.61 -> 1.94 GiB,
    ZeRO-3 3.32 -> 2.24 GiB per rank."""
    if not config.model.hidden_size:  # no model shape (unit tests of other keys): nothing to size by
        return {}
    per_rank = model_parameters_per_rank(config)
    bucket = int(min(MAX_BUCKET, max(MIN_BUCKET, per_rank // 8))) // 2 * 2  # even (DeepSpeed)
    return {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}


ZERO3_PREFETCH_DEFAULT = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size


def zero3_memory_settings(config: Config) -> dict:
    """ZeRO-3's memory settings by model size, the buckets' eighth of the rank's parameters (within [5e6, 5e8]):
    `sub_group_size` (DeepSpeed's default 1e9 makes every smaller model one optimizer sub-group, and the step
    converts a sub-group's whole gradient partition to fp32 at once while the states are live: 4 bytes per
    partitioned parameter), `stage3_max_live_parameters` and `stage3_max_reuse_distance` (default 1e9: every
    parameter gathered in the forward stays gathered until its backward, the whole model in 16 bits on every
    rank; with an eighth, parameters are released after their forward and gathered again for the backward,
    except the last ones, reused within an eighth), and `stage3_prefetch_bucket_size` (default 5e7, kept
    below the live limit). Measured (bench/memory.py, 134M parameters, bf16, 2 ranks, 6 iterations,
    alternated runs): peak 2.09 -> 1.87 GiB per rank, the same CPU time per iteration (bench/README.md).
    A model below 4e7 parameters is one sub-group and keeps every parameter gathered, as before. A plain
    resume of a ZeRO-3 checkpoint with its optimizer state takes the checkpoint's sub-group size
    (`checks.saved_sub_group_size`: DeepSpeed's default 1e9 for one written before this rule)."""
    if config.parallel.zero_stage != 3:
        return {}
    from megatron.checkpoint.checks import saved_sub_group_size  # noqa: PLC0415

    sizes = zero_bucket_sizes(config)
    eighth = sizes.get("reduce_bucket_size")
    chosen = {"sub_group_size": eighth, "stage3_max_live_parameters": eighth, "stage3_max_reuse_distance": eighth,
              "stage3_prefetch_bucket_size": min(eighth, ZERO3_PREFETCH_DEFAULT)} if sizes else {}
    resumed = saved_sub_group_size(config.checkpoint)
    if resumed is not None:  # a resume keeps the checkpoint's optimizer sub-groups (only they load its state)
        chosen["sub_group_size"] = resumed
    return chosen


DS_STAGE3_LIVE_DEFAULT = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters and stage3_max_reuse_distance


def zero3_fetch_by_layer(config: Config, zero: dict) -> bool:
    """Whether ZeRO-3 gathers a transformer layer's parameters as one unit (the layer a DeepSpeed "z3 leaf
    module": one fetch hook and one all-gather per layer, no hooks on its norms and linears) instead of one
    fetch per module. True where every parameter stays gathered from its forward to its backward anyway:
    the live and reuse limits (`zero`, the zero_optimization block as built) hold the whole model of this
    rank, as `zero3_memory_settings` leaves a model below 4e7 parameters. There the unit changes no peak
    (the whole model is gathered at the end of the forward either way) and only removes per-module hook
    work: bench/scaling.py's 4.3M model at 2 ranks, CPU per step and rank 362 -> 336 ms, ZeRO-1's / ZeRO-3's
    0.876 -> 0.971 (bench/README.md). A larger model keeps DeepSpeed's per-module fetch, which its live
    limit bounds."""
    if config.parallel.zero_stage != 3 or not config.model.hidden_size:
        return False
    whole = model_parameters_per_rank(config)
    return all(zero.get(k, DS_STAGE3_LIVE_DEFAULT) >= whole
               for k in ("stage3_max_live_parameters", "stage3_max_reuse_distance"))


def build_ds_config(config: Config) -> dict:
    """DeepSpeed config: the launcher's JSON if given, with the batch, ZeRO, dtype and clipping
    fields always taken from the (validated) arguments, so a user's CLI flag wins over the file."""
    cfg: dict = {}
    if config.parallel.deepspeed_config:
        with open(config.parallel.deepspeed_config) as f:
            cfg = json.load(f)
    wanted = {
        "train_batch_size": config.training.global_batch_size,
        "train_micro_batch_size_per_gpu": config.training.micro_batch_size,
        "gradient_accumulation_steps": config.runtime.num_micro_batches,
        "gradient_clipping": config.optimizer.clip_grad,
    }
    for k, v in wanted.items():
        if k in cfg and cfg[k] != v and config.runtime.rank == 0:
            log.warning("DeepSpeed config %s=%s replaced by %s from the arguments", k, cfg[k], v)
        cfg[k] = v
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = config.parallel.zero_stage
    if config.runtime.data_parallel_size * config.parallel.ds_sequence_parallel_size == 1:
        # one rank reduces nothing: contiguous gradients would only copy every gradient into a bucket
        zero.setdefault("contiguous_gradients", False)
    if config.optimizer.cpu_optimizer:  # --cpu-optimizer (CPU_OPTIMIZER=1 writes the same into the launcher's config)
        zero.setdefault("offload_optimizer", {"device": "cpu"})
    if config.parallel.overlap_grad_reduce:
        zero["overlap_comm"] = True
    if config.parallel.ddp_bucket_size:
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = int(config.parallel.ddp_bucket_size)
    for k, v in {**zero_bucket_sizes(config), **zero3_memory_settings(config)}.items():
        zero.setdefault(k, v)  # by model size, where neither a flag nor the file sets them
    if config.precision.bf16 or config.precision.fp16:
        # The gradients' dtype (--grad-accum-dtype). fp32, the default: Megatron's
        # --accumulate-allreduce-grads-in-fp32, always: the gradients are averaged across ranks and accumulated
        # over micro-batches in fp32 (DeepSpeed's default sums them in bf16/fp16; bf16 ZeRO-1 is then DeepSpeed's
        # `BF16_Optimizer`). Stage 0's half-precision optimizer cannot accumulate in fp32: arguments.py refuses it
        # where it would sum. bf16/fp16: the gradients stay in the weights' dtype at every stage (ZeRO-1/2/3:
        # DeepSpeed's ZeRO optimizers with 16-bit gradient partitions and buckets), averaged across ranks in that
        # dtype: the ZeRO paper's 2 bytes per parameter; arguments.py refuses it where DeepSpeed keeps fp32 anyway.
        grads = config.precision.grad_accum_dtype
        cfg["communication_data_type"] = grads
        if config.parallel.zero_stage >= 1 or grads != "fp32":
            cfg.setdefault("data_types", {})["grad_accum_dtype"] = grads
    # upstream's fp16 launch config has "bfloat16": {"enabled": false, "loss_scale": 1.0}; DeepSpeed's bf16
    # block refuses a loss_scale (bf16 has no loss scaling)
    bf16 = {k: v for k, v in cfg.get("bf16", cfg.get("bfloat16", {})).items() if k != "loss_scale"}
    cfg["bf16"] = {**bf16, "enabled": bool(config.precision.bf16)}
    cfg.pop("bfloat16", None)
    cfg["fp16"] = fp16_block(config.precision, cfg.get("fp16", {}))  # --fp16, the loss-scaling flags (megatron/fp16.py)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("wall_clock_breakdown", False)
    cfg["steps_per_print"] = max(int(cfg.get("steps_per_print", 1)), 10**9)  # we print our own line
    if config.checkpoint.universal_checkpoint:
        cfg.setdefault("checkpoint", {})["load_universal"] = True
    profiler = flops_profiler_config(config)  # --flops-profiler-step
    if profiler:
        cfg["flops_profiler"] = profiler
    return cfg


def flops_profiler_config(config: Config) -> dict | None:
    """The DeepSpeed `flops_profiler` config section for `--flops-profiler-step` (None when not asked)."""
    step = config.logging.flops_profiler_step
    if step is None:
        return None
    # DeepSpeed profiles when its count of finished steps equals profile_step: iteration N = N - 1 finished
    return {"enabled": True, "profile_step": int(step) - 1, "module_depth": -1, "top_modules": 3, "detailed": True,
            "output_file": os.path.join(config.logging.trace_dir, f"flops-profile-step{step}.txt")}


# ---------------------------------------------------------------------------------------------------------------
# The launcher's file (upstream's generateDSconfig, with its fixes: ALCF/notes/launcher.md)
# ---------------------------------------------------------------------------------------------------------------
def _onebitlamb_block(o: argparse.Namespace) -> dict:
    return {"type": "OneBitLamb", "params": {
        "lr": 11e-3, "max_coeff": 0.3, "min_coeff": 0.01, "freeze_step": 1000, "cuda_aware": False,
        "comm_backend_name": o.distributed_backend or "gloo", "coeff_beta": 0.9, "factor_max": 4.0,
        "factor_min": 0.5, "factor_threshold": 0.1}}


def _adamw_block(o: argparse.Namespace) -> dict:
    # torch_adam: torch.optim.AdamW without an accelerator (DeepSpeed's FusedAdam is a GPU kernel)
    return {"type": "AdamW", "params": {
        "lr": o.lr, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps, "weight_decay": o.weight_decay,
        "torch_adam": o.accelerators == 0}}


# --optimizer names DeepSpeed builds from an "optimizer" block (megatron.arguments.DS_BLOCK_TYPES: the same names)
OPTIMIZER_BLOCKS = {"ds.onebitlamb": _onebitlamb_block, "ds.adamw": _adamw_block}

ZERO3 = {"reduce_scatter": False, "stage3_max_live_parameters": 3_000_000_000,
         "stage3_max_reuse_distance": 3_000_000_000, "stage3_param_persistence_threshold": 100_000,
         "stage3_prefetch_bucket_size": 50_000_000, "contiguous_gradients": True, "overlap_comm": True,
         "reduce_bucket_size": 90_000_000, "sub_group_size": 1_000_000_000,
         "offload_optimizer": {"device": "none", "buffer_count": 4, "pipeline_read": False, "pipeline_write": False,
                               "pin_memory": True}}


def launch_config(o: argparse.Namespace) -> dict:
    """The launcher's DeepSpeed config from its trainer flags and options (`launch_parser`)."""
    cfg = {"train_batch_size": o.global_batch_size, "train_micro_batch_size_per_gpu": o.micro_batch_size,
           "gradient_clipping": o.clip_grad, "steps_per_print": 1,
           "gradient_accumulation_steps": o.gradient_accumulation_steps,
           "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False,
           "flops_profiler": {"enabled": o.flops_profiler, "profile_step": 2, "module_depth": -1, "top_modules": 1,
                              "detailed": True, "output_file": None}}
    scaler = {k: DS_DEFAULTS[k] for k in ("loss_scale", "loss_scale_window", "hysteresis", "min_loss_scale")}
    if o.bf16:
        cfg["fp16"], cfg["bfloat16"] = {"enabled": False, **scaler}, {"enabled": True}
    else:
        cfg["communication_data_type"] = "fp32"  # gradients reduced in fp32 (the trainer always does)
        if o.fp16:
            cfg["fp16"], cfg["bfloat16"] = {"enabled": True, **scaler}, {"enabled": False, "loss_scale": 1.0}
    if o.optimizer in OPTIMIZER_BLOCKS:
        cfg["optimizer"] = OPTIMIZER_BLOCKS[o.optimizer](o)
    if o.zero_stage == 3:
        cfg["zero_optimization"] = {"stage": 3, "zero_hpz_partition_size": o.zero_hpz_partition_size, **ZERO3}
        return cfg
    cfg["zero_optimization"] = {"stage": o.zero_stage}
    if o.zero_stage in (1, 2) and o.cpu_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if o.pipeline_model_parallel_size != 1:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    else:
        cfg["comms_logger"] = {"enabled": o.comms_logger, "verbose": False, "debug": False}
    return cfg


def launch_parser() -> argparse.ArgumentParser:
    """The command line of `python -m megatron.deepspeed_config`: the trainer's own spellings of the flags the
    file depends on (the other trainer flags are ignored), plus what only the launcher knows."""
    p = argparse.ArgumentParser(prog="python -m megatron.deepspeed_config", allow_abbrev=False,
                                description="Print (or --write) the DeepSpeed config train_alcf.sh launches with.")
    p.add_argument("--write", metavar="PATH", help="write the JSON to PATH (its directory is created) instead of stdout")
    g = p.add_argument_group("launcher options (not trainer flags)")
    g.add_argument("--gradient-accumulation-steps", type=int, required=True, help="GRAD_ACC_STEPS")
    g.add_argument("--accelerators", type=int, default=0, help="accelerators per node (0: ds.adamw uses torch's AdamW)")
    g.add_argument("--zero-hpz-partition-size", type=int, default=1, help="ZERO_HPZ_PARTITION_SIZE (ZeRO-3)")
    g.add_argument("--comms-logger", action="store_true", help="COMMS_LOGGER: DeepSpeed's comms logger (PP = 1)")
    g.add_argument("--flops-profiler", action="store_true", help="FLOPS_PROFILER: DeepSpeed's flops profiler at step 2")
    g = p.add_argument_group("trainer flags read (pretrain_gpt.py spellings)")
    for flag, kind in (("--global-batch-size", int), ("--micro-batch-size", int), ("--clip-grad", float),
                       ("--zero-stage", int), ("--optimizer", str), ("--lr", float), ("--adam-beta1", float),
                       ("--adam-beta2", float), ("--adam-eps", float), ("--weight-decay", float),
                       ("--pipeline-model-parallel-size", int)):
        g.add_argument(flag, type=kind, required=True)
    g.add_argument("--distributed-backend", default=None)
    for flag in ("--bf16", "--fp16", "--cpu-optimizer"):
        g.add_argument(flag, action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    o, _trainer_only = launch_parser().parse_known_args(argv)
    text = json.dumps(launch_config(o), indent=2) + "\n"
    if not o.write:
        sys.stdout.write(text)
        return 0
    os.makedirs(os.path.dirname(o.write) or ".", exist_ok=True)
    tmp = f"{o.write}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, o.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
