"""The only place that touches DeepSpeed's internals, and the DeepSpeed versions this code supports.

Every change to what DeepSpeed does is one named function with a docstring giving the DeepSpeed
behaviour it changes and why; tests/test_deepspeed_compat.py checks, by name and signature, every
DeepSpeed attribute these functions rely on, so an upgrade that moves one fails there and not
silently in a run.

* `norms`: the gradient norm in fp64 at every ZeRO stage and precision (`exact_grad_norm`).
* `engine`: per-engine changes after `deepspeed.initialize` -- fp16 on CPU (`allow_fp16_on_cpu`),
  the ZeRO loss scaler's growth after the step (`defer_loss_scale_growth`), no all-reduce over one
  replica (`skip_single_replica_allreduce` at stage 0 and bf16 ZeRO-1, `skip_single_replica_reduction`
  at ZeRO-1/2), the fp32 weights as ZeRO-1/2's master copy at one replica
  (`share_single_replica_master_weights`), bf16 ZeRO-1's fp32 gradient copies overwritten rather than
  zeroed and added to (`copy_first_bf16_gradient`), no second inf/NaN scan at bf16 stage 0
  (`skip_bf16_overflow_scan`), its fp32 gradient copies made and stepped a chunk at a time
  (`step_stage0_in_chunks`; bf16 ZeRO-1/2's too, `zero_step.step_zero12_in_chunks`), the pipeline's optimizer step (`wrap_model_step`), `--no-save-optim`
  under ZeRO (`without_optimizer_shards`), the checkpoint engine (`replace_checkpoint_engine`), a
  skipped step (`step_without_update`); and around or before it, no zero-gradient optimizer step when the
  bf16 stage 0 optimizer is built (`no_initial_zero_step`), ZeRO-3's fetch by layer (`fetch_zero3_by_module_type`),
  ZeRO-3's parameters partitioned over the
  sequence+data-parallel group under Ulysses SP (`partition_zero3_over_sequence_data_parallel`), and
  its reduce-scatter summing over the SP ranks (`sum_zero3_scatter_over_sequence_parallel`).
* `single_replica`: fp32 ZeRO-1/2's flat gradient partition at one replica allocated once and filled in
  the backward, so `step` no longer flattens the gradients into a new tensor (`reuse_single_replica_gradient_partition`);
  bf16 ZeRO-2's gradients added straight into its fp32 partition, kept from step to step
  (`add_single_replica_gradients_to_fp32_partition`).
* `comm`: before `deepspeed.init_distributed`, no CPU shared-memory all-reduce op (`skip_shm_inference_op`:
  DeepSpeed compiles it in every new environment for its inference all-reduce, which training never calls).
* `imports`: DeepSpeed's Muon kernels compiled on first use, not when ZeRO imports them (`defer_muon_compile`:
  2.3 s of CPU per rank at every start-up otherwise).
* `partitions`: where ZeRO put each parameter (layouts of the flat partitions, ZeRO-3 local parts).
* `universal`: the private helpers of DeepSpeed's universal-checkpoint converter that
  tools/convert_checkpoint/ds_to_universal.py calls.

`check_version()` runs at start-up (before DeepSpeed is initialized): a DeepSpeed outside
`SUPPORTED` is refused with the install line, unless ``MEGATRON_ALLOW_UNTESTED_DEEPSPEED=1`` says to
go on with a warning (the overrides above may then fail or be wrong).
"""
from __future__ import annotations

import os

from megatron.deepspeed_compat.comm import skip_shm_inference_op  # noqa: F401
from megatron.deepspeed_compat.imports import defer_muon_compile  # noqa: F401
from megatron.deepspeed_compat.engine import (  # noqa: F401  (the names callers use)
    allow_fp16_on_cpu, copy_first_bf16_gradient, defer_loss_scale_growth, fetch_zero3_by_module_type,
    innermost_optimizer, no_initial_zero_step,
    partition_zero3_over_sequence_data_parallel, replace_checkpoint_engine, share_single_replica_master_weights,
    skip_bf16_overflow_scan, skip_single_replica_allreduce, skip_single_replica_reduction, step_stage0_in_chunks,
    step_without_update,
    sum_zero3_scatter_over_sequence_parallel, without_optimizer_shards, wrap_model_step)
from megatron.deepspeed_compat.zero_step import step_zero12_in_chunks  # noqa: F401
from megatron.deepspeed_compat.single_replica import (  # noqa: F401
    add_single_replica_gradients_to_fp32_partition, reuse_single_replica_gradient_partition)
from megatron.deepspeed_compat.norms import (  # noqa: F401
    exact_grad_norm, fp64_clip_grad_norm_, fp64_global_norm_of_tensors, fp64_grad_norm_direct, fp64_sq_norm,
    fp64_weight_norm)

# the DeepSpeed releases the test suite ran on (keep in step with setup.py's install_requires)
SUPPORTED = (">=0.19", "<0.20")
ALLOW_ENV = "MEGATRON_ALLOW_UNTESTED_DEEPSPEED"


def _release(version: str) -> tuple[int, int, int]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    return tuple((parts + [0, 0, 0])[:3])


def version_problem(version: str | None) -> str | None:
    """None when DeepSpeed `version` is in `SUPPORTED`, else the one-line message with the fix."""
    spec = ",".join(SUPPORTED)
    fix = f"pip install 'DeepSpeed{spec}' (with torch pinned in the same command)"
    if version is None:
        return f"DeepSpeed is not installed: {fix}"
    low, high = (_release(s.lstrip("<>=")) for s in SUPPORTED)
    if low <= _release(version) < high:
        return None
    return (f"DeepSpeed {version} is installed; this trainer is tested with DeepSpeed{spec}: {fix}, "
            f"or set {ALLOW_ENV}=1 to run with it anyway (untested)")


def check_version() -> str | None:
    """Raise `RuntimeError` when the installed DeepSpeed is outside `SUPPORTED` (and not allowed by
    the environment); return the warning to log when it is allowed, else None."""
    try:
        import deepspeed  # noqa: PLC0415  (the trainer imports it next anyway)

        installed = str(deepspeed.__version__)
    except ImportError:
        installed = None
    problem = version_problem(installed)
    if problem is None:
        return None
    if installed is not None and os.environ.get(ALLOW_ENV) == "1":
        return f"WARNING: {problem.split(':')[0]}; going on because {ALLOW_ENV}=1"
    raise RuntimeError(problem)
