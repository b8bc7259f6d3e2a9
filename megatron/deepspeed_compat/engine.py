"""Named changes to a DeepSpeed engine or its optimizer after `deepspeed.initialize`.

Each function replaces one DeepSpeed behaviour on one instance (never on the class), says what
DeepSpeed does and why it is changed, and is covered by the contract test in
tests/test_deepspeed_compat.py (which fails if DeepSpeed renames or re-signs what it relies on).
"""
from __future__ import annotations

import contextlib
from typing import Callable


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator reports fp16 as unsupported where oneDNN has no native fp16, and
    `deepspeed.initialize` then refuses fp16; torch computes every fp16 op on such CPUs (slower, same
    rounding), so fp16 runs are allowed (megatron/fp16.py explains the precision contract)."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        acc.is_fp16_supported = lambda: True


def defer_loss_scale_growth(optimizer) -> None:
    """DeepSpeed's ZeRO optimizers (stages 1, 2 and 3) call ``_update_scale(False)`` -- which doubles
    the scale after `loss_scale_window` overflow-free steps -- *before* they unscale and clip the
    gradients with the (now doubled) scale, so every growth step applies half the gradient (and clips
    and reports the norm against the wrong scale). Megatron's scaler unscales first. Here a
    no-overflow update is deferred until `step()` has applied the update; an overflow is handled at
    once, as before. Tested by tests/test_fp16.py (a run whose scale grows equals one whose scale
    stays constant)."""
    update, step = optimizer._update_scale, optimizer.step
    pending: list[bool] = []

    def deferred_update(overflow=False):
        if overflow:
            return update(overflow)
        pending.append(False)
        return None

    def step_then_grow(*args, **kwargs):
        pending.clear()
        try:
            return step(*args, **kwargs)
        finally:
            if pending:
                pending.clear()
                update(False)

    optimizer._update_scale = deferred_update  # instance attributes: DeepSpeed calls self._update_scale / .step
    optimizer.step = step_then_grow


def skip_single_replica_allreduce(engine) -> bool:
    """With one data-parallel replica (DP x SP = 1) DeepSpeed's engine still flattens every gradient,
    "all-reduces" it over the group of one and copies it back after each backward, at stage 0 and
    with its `BF16_Optimizer` (bf16 at ZeRO-1, which reduces the fp32 gradient copies it accumulated:
    9 % of a bf16 step on bench/zero_tax.py's model): off (`enable_backward_allreduce`; True when
    turned off). Kept where the engine's reduction feeds the optimizer: DeepSpeed's ZeRO-1/2
    optimizer fills its gradient partitions there (`skip_single_replica_reduction` for that one)."""
    if engine.seq_dp_world_size != 1:
        return False
    if engine.zero_optimization_stage() != 0 and type(getattr(engine, "optimizer", None)).__name__ != "BF16_Optimizer":
        return False
    engine.enable_backward_allreduce = False
    return True


def share_single_replica_master_weights(engine) -> bool:
    """fp32 ZeRO-1/2 over one data-parallel replica: DeepSpeed's optimizer keeps a separate fp32
    "master" copy of the whole flat model (`single_partition_of_fp32_groups`), steps it and copies it
    back into the fp32 weights (`bit16_partitions[...].copy_(fp32_partition)`) after every step: the
    same values twice and a full copy per step. Here the master is made a view of the weights' own
    flat buffer (both are fp32, same size, the partition is the whole group), so the optimizer
    updates the weights in place and the copy back is a copy of a tensor onto itself (which torch
    skips). The parameters' links into the master (`_link_all_hp_params`, what DeepSpeed redoes when
    it moves the master itself) are rebuilt. True when installed; not with offload, half precision
    (the master is wider than the weights) or several replicas (each master is one partition)."""
    import torch.distributed as dist  # noqa: PLC0415

    opt = getattr(engine, "optimizer", None)
    if engine.zero_optimization_stage() not in (1, 2) or not hasattr(opt, "single_partition_of_fp32_groups"):
        return False
    groups = getattr(opt, "real_dp_process_group", None) or []
    if not groups or any(dist.get_world_size(group=g) != 1 for g in groups) or getattr(opt, "cpu_offload", True):
        return False
    pairs = list(zip(opt.single_partition_of_fp32_groups, opt.parallel_partitioned_bit16_groups))
    if len(pairs) != len(groups) or any(
            len(parts) != 1 or master.dtype != parts[0].dtype or master.shape != parts[0].shape
            or master.device != parts[0].device for master, parts in pairs):
        return False
    for master, parts in pairs:
        master.data = parts[0].data  # the optimizer's parameter object (and its state) stays the same
    opt._link_all_hp_params()
    return True


def skip_single_replica_reduction(engine) -> bool:
    """ZeRO-1/2 over one data-parallel replica (a real ZeRO run at one rank, --keep-zero-stage):
    DeepSpeed's `buffered_reduce_fallback` (the gradient reduction without contiguous buckets)
    flattens every gradient, divides it by the group size 1, all-reduces it over the group of one and
    copies it back, which returns every gradient unchanged, bit for bit. Replaced by nothing there
    (True when installed). Kept where the reduction does more: several replicas, sequence parallelism
    (DeepSpeed reduces over DP x SP), contiguous gradient buckets, and the fp32 gradient partition of
    bf16/fp16 runs (`_buffered_reduce_fallback_preserving_fp32`, which fills the partition the
    optimizer steps on; not this function)."""
    import torch.distributed as dist  # noqa: PLC0415

    opt = getattr(engine, "optimizer", None)
    if engine.zero_optimization_stage() not in (1, 2) or not hasattr(opt, "buffered_reduce_fallback"):
        return False
    groups = getattr(opt, "real_dp_process_group", None) or []
    if not groups or any(dist.get_world_size(group=g) != 1 for g in groups):
        return False
    if getattr(opt, "sequence_parallel_size", 1) != 1 or getattr(opt, "contiguous_gradients", False):
        return False
    opt.buffered_reduce_fallback = lambda *args, **kwargs: None
    return True


def skip_bf16_overflow_scan(engine) -> None:
    """DeepSpeed's bf16 stage 0 optimizer scans every gradient for inf/NaN (amax + amin per tensor),
    then computes their norm, which it checks again and skips the step on the same way: the scan is
    1.5 % of a bf16 step on the bench model. NaN/Inf skipping stays tested (tests/test_numerics.py)."""
    checker = getattr(engine.optimizer, "overflow_checker", None)
    if checker is not None and hasattr(engine.optimizer, "_skip_invalid_grad_norm"):
        checker.check = lambda param_groups=None: False


def copy_first_bf16_gradient(engine) -> bool:
    """DeepSpeed's `BF16_Optimizer` (bf16 ZeRO-1) zeroes its fp32 gradient copies after every step
    (`clear_hp_grads`) and adds each bf16 gradient into them (`_update_hp_grad`): a full fp32 fill
    and a read of the zeros per step, 3-4 % of a bf16 step at one replica. Here a copy that holds
    no gradient of this step yet is overwritten with the gradient (0 + g is g, bit for bit); later
    micro-batches add as before. Only the "has a gradient" flags are cleared after the step, and
    the copies of parameters that got no gradient in a backward are zeroed right after it
    (`backward_epilogue`), before anything reads them. One data-parallel replica only (what the
    tests cover); not with DeepSpeed's AutoEP folding (which corrects the gradient while adding).
    True when installed."""
    opt = getattr(engine, "optimizer", None)
    if type(opt).__name__ != "BF16_Optimizer" or engine.seq_dp_world_size != 1 or \
            getattr(opt, "autoep_folding_tp_group", None) is not None:
        return False
    update, epilogue = opt._update_hp_grad, opt.backward_epilogue
    has, grads = opt.fp32_groups_has_gradients, opt.fp32_groups_gradients

    def update_hp_grad(lp, group_idx, param_idx, clear_lp_grads):
        if lp.grad is None or has[group_idx][param_idx]:
            return update(lp, group_idx, param_idx, clear_lp_grads)
        hp_grad = grads[group_idx][param_idx]
        hp_grad.copy_(lp.grad.view(hp_grad.shape))
        lp._hp_grad = hp_grad
        has[group_idx][param_idx] = True
        if clear_lp_grads:
            lp.grad.zero_()
        return None

    def clear_hp_grads():
        for flags in has:
            flags[:] = [False] * len(flags)

    def backward_epilogue(*args, **kwargs):
        result = epilogue(*args, **kwargs)
        for flags, group in zip(has, grads):
            for flag, hp_grad in zip(flags, group):
                if not flag:
                    hp_grad.zero_()
        return result

    opt._update_hp_grad, opt.clear_hp_grads, opt.backward_epilogue = update_hp_grad, clear_hp_grads, backward_epilogue
    return True


@contextlib.contextmanager
def no_initial_zero_step():
    """While DeepSpeed builds the engine: its stage-0 half-precision optimizers (`FP16_UnfusedOptimizer`:
    bf16 at stage 0 with torch's optimizers; `FP16_Optimizer`) skip the step with all-zero gradients their
    constructor takes (`initialize_optimizer_states`). For Adam(W) that step counts (state step 1, zero
    moments) and decays the master weights by lr x weight decay, so the first real update was Adam's
    bias-corrected second step, 0.74x the first one: on the tiny test model, bf16 stage 0 losses 6.2708,
    5.6025, 5.8830 against ZeRO-1's 6.2708, 5.5533, 6.1975. It also made a zero gradient for every weight,
    bf16 and fp32, at once: bench/memory.py's 134M model peaked at 2.58 GiB building the engine against
    ~2.24 in its training steps. The optimizer's state is made by its first real step instead, as torch's
    optimizers do, and the masters stay equal to the weights. (The pipeline engine needs none of this: with
    PP > 1 bf16 runs `BF16_Optimizer`, and fp16 is refused there and at stage 0.)"""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer  # noqa: PLC0415
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer  # noqa: PLC0415

    saved = {cls: cls.__dict__["initialize_optimizer_states"] for cls in (FP16_Optimizer, FP16_UnfusedOptimizer)}
    try:
        for cls in saved:
            cls.initialize_optimizer_states = lambda self: None
        yield
    finally:
        for cls, method in saved.items():
            cls.initialize_optimizer_states = method


def wrap_model_step(engine, make_step: Callable[[Callable], Callable]) -> None:
    """The pipeline engine applies the optimizer step inside its schedule (`_take_model_step`), where
    the trainer cannot call it: `make_step(original)` returns the step to use instead (the LR
    increment and the numerics guard's skip decision, megatron/core/pipeline_schedule.py)."""
    engine._take_model_step = make_step(engine._take_model_step)  # instance attribute: self._take_model_step


@contextlib.contextmanager
def without_optimizer_shards(engine, skip: bool):
    """`--no-save-optim` under ZeRO: DeepSpeed's `save_checkpoint` has no option to leave out the
    ZeRO optimizer shards; its `save_zero_checkpoint` flag decides, so it is off for one save."""
    saved = getattr(engine, "save_zero_checkpoint", None)
    skip = skip and hasattr(engine, "save_zero_checkpoint")
    if skip:
        engine.save_zero_checkpoint = False
    try:
        yield
    finally:
        if skip:
            engine.save_zero_checkpoint = saved


def replace_checkpoint_engine(engine, wrap: Callable, wrapper_type: type):
    """DeepSpeed reads and writes every checkpoint file through `engine.checkpoint_engine`; it is
    wrapped once (restricted unpickling, write failures recorded, the manifest's checksums:
    megatron/checkpoint/io.py). Returns the wrapper (None when the engine has no checkpoint engine)."""
    inner = getattr(engine, "checkpoint_engine", None)
    if inner is None:
        return None
    if not isinstance(inner, wrapper_type):
        inner = wrap(inner)
        engine.checkpoint_engine = inner
    return inner


def is_plain_torch_checkpoint_engine(inner) -> bool:
    """True for DeepSpeed's default (torch.save / torch.load) checkpoint engine."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: PLC0415

    return type(inner) is TorchCheckpointEngine


def innermost_optimizer(optimizer):
    """The optimizer whose step() changes the weights (DeepSpeed's wrappers keep it in `.optimizer`)."""
    seen = set()
    while getattr(optimizer, "optimizer", None) is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def step_without_update(engine, step_fn: Callable[[], None]) -> None:
    """Run DeepSpeed's step (it clears the gradients and advances its counters, keeping every rank's
    collectives matched) with the weight update and the LR step turned into no-ops, and count it as
    skipped: the numerics guard's skip of a non-finite iteration (DeepSpeed has no public way)."""
    before = int(getattr(engine, "skipped_steps", 0))
    inner, sched = innermost_optimizer(engine.optimizer), engine.lr_scheduler
    patched = [(obj, obj.__dict__.get("step")) for obj in (inner, sched) if obj is not None]
    for obj, _ in patched:  # an instance attribute shadows the method for this one call
        obj.step = lambda *a, **k: None
    try:
        step_fn()
    finally:
        for obj, previous in patched:
            if previous is None:
                del obj.step
            else:
                obj.step = previous
    if int(getattr(engine, "skipped_steps", 0)) == before:
        engine.skipped_steps = before + 1


def fetch_zero3_by_module_type(model, leaf_types: list) -> None:
    """Before `deepspeed.initialize` at ZeRO-3: each module of `leaf_types` a DeepSpeed "z3 leaf module",
    its parameters gathered and released as one unit (one fetch hook and one all-gather) instead of one
    fetch per submodule (`megatron.deepspeed_config.zero3_fetch_by_layer` says where)."""
    from deepspeed.utils import set_z3_leaf_modules  # noqa: PLC0415

    set_z3_leaf_modules(model, list(leaf_types))


def partition_zero3_over_sequence_data_parallel(model, ds_config: dict, dtype, mpu) -> None:
    """ZeRO-3 with Ulysses SP > 1: partition the parameters over the sequence+data-parallel group,
    before `deepspeed.initialize` (which then finds them partitioned and leaves them so).

    DeepSpeed 0.19.8 reduces ZeRO-3 gradients over each parameter's `ds_process_group`, and
    `DeepSpeedZeRoOffload._convert_to_zero_parameters` sets that to `mpu.get_data_parallel_group()`:
    the data-parallel ranks only, without the SP ranks (DeepSpeed's own Ulysses tests pass an mpu
    without that method, so they get the world group). The optimizer is built over the
    sequence+data-parallel group, but the reduction of each gradient then skips the other SP ranks:
    every SP rank stepped with the gradient of its own part of the sequences (measured on the test
    model at SP = 2: the ZeRO-3 gradient equal to SP rank 0's share to 1e-6, off the full gradient
    by 20-80 % per parameter; the logged norm 0.65 instead of 0.83, and the SP ranks' weights drift
    apart). `deepspeed.zero.Init(module=...)` with the sequence+data-parallel group partitions them
    over the group the optimizer reduces over, as at SP = 1 (where both groups are the same)."""
    import deepspeed  # noqa: PLC0415

    with deepspeed.zero.Init(module=model, data_parallel_group=mpu.get_sequence_data_parallel_group(),
                             config_dict_or_path=ds_config, mpu=mpu, dtype=dtype):  # (mpu: the batch check)
        pass


def sum_zero3_scatter_over_sequence_parallel(engine, sp: int) -> None:
    """ZeRO-3 with Ulysses SP > 1: the gradient partitions of DeepSpeed's reduce-scatter path, x SP.

    Each SP rank's gradient is that of its share of the loss, so the gradient is their sum over
    the SP ranks, averaged over the data-parallel ones: DeepSpeed divides by (SP x DP) / SP. Its
    stage-3 all-reduce paths do (`__avg_scatter_contiguous_grads`, `allreduce_bucket`), but
    `DeepSpeedZeroOptimizer_Stage3.__avg_scatter_grads` (the default `reduce_scatter: true`, and
    any bucket larger than `reduce_bucket_size`) goes through `reduce_scatter_coalesced`, which
    divides by SP x DP: measured at SP = 2, every gradient exactly half the SP = 1 one."""
    optimizer = engine.optimizer
    name = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"
    original = getattr(optimizer, name)

    def avg_scatter_grads(params_to_reduce, communication_data_type):
        return [g.mul_(sp) for g in original(params_to_reduce, communication_data_type)]

    setattr(optimizer, name, avg_scatter_grads)


STAGE0_STEP_CHUNK = 1 << 24  # elements of fp32 gradient converted at a time (64 MiB)


def step_stage0_in_chunks(engine, chunk_elements: int | None = None) -> bool:
    """DeepSpeed's stage-0 half-precision optimizer (`FP16_UnfusedOptimizer`: bf16 at stage 0) converts
    every 16-bit gradient to an fp32 copy, then unscales and clips them and steps the wrapped optimizer
    once: for the length of the step a second, fp32 copy of all gradients, 4 bytes per parameter (the
    ZeRO-0 peak of bench/memory.py's 134M-parameter model, 2.73 GiB, against 2.46 after the step). Here
    the same step (overflow check, norm, loss scaler, clipping factor) then converts, scales and steps the
    parameters about `chunk_elements` at a time, so one chunk's fp32 gradients exist at once; the wrapped
    optimizer steps only the parameters that have a gradient, each element sees the same operations: the
    same bits (tests/test_deepspeed_compat.py). Only for torch's Adam/AdamW, whose state is per parameter:
    an optimizer with a per-step counter or a global statistic (schedule-free's averaging weights, a
    global norm, a Hessian refresh every k steps) would count a chunked step several times, so it keeps
    DeepSpeed's step. Not with DeepSpeed's legacy fused LAMB. True when installed."""
    import torch  # noqa: PLC0415
    from deepspeed.runtime.fp16 import unfused_optimizer as unfused  # noqa: PLC0415

    opt = getattr(engine, "optimizer", None)
    if type(opt).__name__ != "FP16_UnfusedOptimizer" or opt.fused_lamb_legacy:
        return False
    if type(opt.optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False  # stepped once per chunk: only an optimizer whose every state is per parameter
    pairs = [pair for g32, g16 in zip(opt.fp32_groups, opt.fp16_groups) for pair in zip(g32, g16)]

    def chunks():
        size = chunk_elements or STAGE0_STEP_CHUNK
        start = count = 0
        for i, (p32, _) in enumerate(pairs):
            count += p32.numel()
            if count >= size:
                yield pairs[start:i + 1]
                start, count = i + 1, 0
        if start < len(pairs):
            yield pairs[start:]

    def step(closure=None):
        opt.overflow = opt.overflow_checker.check()
        if opt.overflow:
            return opt._skip_invalid_grad_norm()
        norm_groups = []
        for group in opt.fp16_groups:  # the module's get_weight_norm: norms.py's fp64 (exact_grad_norm)
            grads_for_norm, _ = unfused.split_params_grads_into_shared_and_expert_params(group)
            norm_groups.append(unfused.get_weight_norm(grads_for_norm, mpu=opt.mpu) if grads_for_norm else 0.0)
        opt._global_grad_norm = unfused.get_global_norm(norm_list=norm_groups)
        if unfused.is_invalid_grad_norm(opt._global_grad_norm):
            return opt._skip_invalid_grad_norm()
        opt._update_scale(False)
        combined_scale = opt.unscale_and_clip_grads(opt._global_grad_norm, apply_scale=False)
        for chunk in chunks():
            for p32, p16 in chunk:
                p32.grad = torch.zeros(p16.size(), dtype=p32.dtype, device=p32.device) if p16.grad is None \
                    else p16.grad.to(p32.dtype)
                p32.grad.data.mul_(1. / combined_scale)
            opt.optimizer.step()
            for p32, p16 in chunk:
                p32.grad = None
                p16.data.copy_(p32.data)
        return opt.overflow

    opt.step = step  # instance attribute: the engine calls self.optimizer.step()
    return True
