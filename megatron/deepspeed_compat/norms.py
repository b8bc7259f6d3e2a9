"""The gradient norm, accumulated in fp64 at every ZeRO stage and precision (`exact_grad_norm`).

DeepSpeed's stage 0 paths take each gradient's norm with ``tensor.float().norm()`` (torch's fp32
CPU kernel), which drops small terms on large tensors: on the tiny test model at step 1 the fp32
stage 0 norm was 1.041400671 against 1.0414596947 in fp64 (the whole gap in the output layer), and
clipping used that norm. ZeRO 1/2 take each partition's norm in a wider type but add the squares
in fp32 (2.5e-7 relative off under bf16); ZeRO-3 is exact already.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


NORM_CHUNK = 1 << 16  # CPU: elements per fp64 norm; its float64 copy (512 KiB) stays in the core's cache
DEVICE_NORM_CHUNK = 1 << 24  # GPU/XPU: bounds the transient float64 copy (128 MiB) with few kernels


def _accelerator_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    return torch.device(get_accelerator().current_device_name())


def fp64_sq_norm(tensors, device=None) -> torch.Tensor:
    """Sum of squares of `tensors`, accumulated in fp64: a 0-d fp64 tensor on the tensors' device (on
    `device`, default DeepSpeed's current accelerator device, when there are none), with no host
    synchronisation, so that the collectives after it get a tensor their backend serves (nccl and
    xccl have no CPU backend) and a GPU step is not stalled once per chunk.
    `vector_norm(dtype=float64)` converts its whole input first, a transient copy as large as the
    largest gradient (95 MB for a 32000 x 768 bf16 output layer), and sums it less exactly (relative
    error 4.9e-14 there, 7e-16 in chunks, against the sum of squares of the float64 copy). On the CPU,
    chunks of 2^16 rather than 2^20: 25.6M fp32 gradients on one core in 18.7 ms instead of 24.6, bf16 in
    15.2 instead of 21.6, the conversion's copy staying in cache (one fp32 norm per tensor, DeepSpeed's:
    8.2 and 12.3 ms, 1e-4 relative off); on an accelerator, 2^24 (the copy bounded, ~60 kernels per
    billion elements)."""
    total = None
    for t in tensors:
        flat = t.detach().reshape(-1)
        chunk = NORM_CHUNK if flat.device.type == "cpu" else DEVICE_NORM_CHUNK
        for piece in flat.split(chunk):
            sq = torch.linalg.vector_norm(piece, dtype=torch.float64) ** 2
            # (gradients on two devices, not seen in practice, are summed where the first one is)
            total = sq if total is None else total.add_(sq.to(total.device))
    if total is None:
        return torch.zeros((), dtype=torch.float64, device=device if device is not None else _accelerator_device())
    return total


def _model_parallel_sum(total: torch.Tensor, mpu) -> torch.Tensor:
    if mpu is not None and dist.is_initialized() and dist.get_world_size(mpu.get_model_parallel_group()) > 1:
        dist.all_reduce(total, group=mpu.get_model_parallel_group())
    return total


def fp64_global_norm_of_tensors(input_tensors, norm_type=2, mpu=None, moe_ep_group=None, _original=None):
    """`deepspeed.runtime.utils.get_global_norm_of_tensors` (the bf16 optimizer's norm), with the
    sum of squares in fp64. Same contract: the tensors' L2 norm summed over the model-parallel
    group, -1 when it is not finite. Other norm types and MoE groups go to DeepSpeed's."""
    if float(norm_type) != 2.0 or moe_ep_group is not None:
        return _original(input_tensors, norm_type=norm_type, mpu=mpu, moe_ep_group=moe_ep_group)
    norm = _model_parallel_sum(fp64_sq_norm(input_tensors), mpu).sqrt()
    norm = torch.where(torch.isfinite(norm), norm, -1.0)  # on its device: no synchronisation here
    return norm.to(dtype=torch.float32)


def fp64_clip_grad_norm_(parameters, max_norm: float, mpu=None) -> torch.Tensor:
    """`deepspeed.runtime.utils.clip_grad_norm_` (fp32 stage 0) in fp64: the norm of the
    gradients, parameters replicated across tensor-parallel ranks counted once (on TP rank 0), then
    every gradient scaled by min(1, max_norm / (norm + 1e-6)). Returns the norm (before clipping)."""
    from deepspeed.runtime.utils import is_model_parallel_parameter  # noqa: PLC0415

    params = [p for p in parameters if p.grad is not None]
    mp_rank0 = mpu is None or mpu.get_model_parallel_rank() == 0
    counted = [p.grad for p in params if mp_rank0 or is_model_parallel_parameter(p)]
    norm = _model_parallel_sum(fp64_sq_norm(counted), mpu).sqrt()
    if max_norm > 0:
        coef = min(1.0, float(max_norm) / (float(norm) + 1e-6))
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
    return norm.float()


def fp64_weight_norm(parameters, norm_type=2, mpu=None, _original=None):
    """`deepspeed.runtime.utils.get_weight_norm` (the norm DeepSpeed's fp16/bf16 optimizer at stage 0
    takes of each flat gradient group) with the squares summed in fp64. Same contract: TP-replicated
    tensors counted on TP rank 0 only, summed over the model-parallel group, -1 when not finite."""
    from deepspeed.runtime.utils import is_model_parallel_parameter  # noqa: PLC0415
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank  # noqa: PLC0415

    if float(norm_type) != 2.0:
        return _original(parameters, norm_type=norm_type, mpu=mpu)
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    tp_rank = bwc_tensor_model_parallel_rank(mpu=mpu)
    counted = [p for p in parameters if not getattr(p, "ds_pipe_replicated", False)
               and (tp_rank == 0 or is_model_parallel_parameter(p))]
    norm = _model_parallel_sum(fp64_sq_norm(counted), mpu).sqrt()
    return float(norm) if torch.isfinite(norm) else -1


def fp64_grad_norm_direct(zero, gradients, params, norm_type=2, _original=None):
    """ZeRO 1/2's `get_grad_norm_direct` (the norm of this rank's gradient partition, summed over
    the data- and model-parallel groups) with the squares summed in fp64. Same contract: pipeline-
    replicated parameters skipped, TP-replicated ones counted on TP rank 0, -1 when not finite."""
    from deepspeed.runtime.utils import is_model_parallel_parameter  # noqa: PLC0415

    if float(norm_type) != 2.0:
        return _original(gradients, params, norm_type)
    grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
    counted = [g for g, p in zip(grads, params) if not getattr(p, "ds_pipe_replicated", False)
               and (is_model_parallel_parameter(p) or zero.model_parallel_rank == 0)]
    total = fp64_sq_norm(counted, device=getattr(zero, "device", None))
    dist.all_reduce(total, group=zero.dp_process_group)
    zero._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    norm = total.sqrt()
    return torch.where(torch.isfinite(norm), norm, -1.0)  # on the gradients' device, as DeepSpeed's


def exact_grad_norm(engine) -> None:
    """Install the fp64 norms on `engine` (no-op where DeepSpeed's is already exact):

    * fp32 at stage 0: the engine's `clip_fp32_gradients` (which also dropped the norm it computed,
      so `get_global_grad_norm()` was None) computes, keeps and clips with the fp64 norm; with
      ``--clip-grad 0`` DeepSpeed never calls it, so the norm is taken at `engine.step` instead.
    * DeepSpeed's BF16_Optimizer (bf16 at ZeRO-1 with fp32 gradient accumulation, and PP): its
      module-level `get_global_norm_of_tensors`.
    * DeepSpeed's fp16 optimizers at stage 0 (`FP16_Optimizer`, and `FP16_UnfusedOptimizer`: bf16, and fp16
      with torch's optimizers): their module's `get_weight_norm`.
    * ZeRO 1/2: the optimizer's `get_grad_norm_direct`.
    """
    opt = getattr(engine, "optimizer", None)
    if type(opt).__name__ == "BF16_Optimizer":
        import deepspeed.runtime.bf16_optimizer as bf16  # noqa: PLC0415
        from deepspeed.runtime import utils  # noqa: PLC0415

        if bf16.get_global_norm_of_tensors is utils.get_global_norm_of_tensors:
            original = utils.get_global_norm_of_tensors
            bf16.get_global_norm_of_tensors = (
                lambda input_tensors, norm_type=2, mpu=None, moe_ep_group=None: fp64_global_norm_of_tensors(
                    input_tensors, norm_type, mpu, moe_ep_group, _original=original))
        return
    if engine.zero_optimization_stage() in (1, 2):
        if hasattr(opt, "get_grad_norm_direct") and hasattr(opt, "dp_process_group"):
            original = opt.get_grad_norm_direct
            opt.get_grad_norm_direct = (lambda gradients, params, norm_type=2: fp64_grad_norm_direct(
                opt, gradients, params, norm_type, _original=original))
        return
    if engine.zero_optimization_stage() != 0:
        return
    if type(opt).__name__ in ("FP16_Optimizer", "FP16_UnfusedOptimizer"):  # fp16, or bf16, at stage 0
        import deepspeed.runtime.fp16.fused_optimizer as fused  # noqa: PLC0415
        import deepspeed.runtime.fp16.unfused_optimizer as unfused  # noqa: PLC0415
        from deepspeed.runtime import utils  # noqa: PLC0415

        module = fused if type(opt).__name__ == "FP16_Optimizer" else unfused
        if module.get_weight_norm is utils.get_weight_norm:
            original = utils.get_weight_norm
            module.get_weight_norm = (lambda parameters, norm_type=2, mpu=None: fp64_weight_norm(
                parameters, norm_type, mpu, _original=original))
        return
    if engine.fp16_enabled() or opt is None:
        return

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = fp64_clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(),
                                                        mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_fp32_gradients
    if engine.gradient_clipping() <= 0:  # DeepSpeed takes no norm at all: take it before each step
        step = engine._take_model_step

        def take_model_step(*args, **kwargs):
            engine._global_grad_norm = fp64_clip_grad_norm_(engine.module.parameters(), 0.0, mpu=engine.mpu)
            return step(*args, **kwargs)

        engine._take_model_step = take_model_step
