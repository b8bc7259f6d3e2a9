"""Whole-model statistics for the log line: `--log-params-norm` and `--log-num-zeros-in-grad`.

Both count every element of the model exactly once, whatever the layout:

* tensor parallelism: a split tensor (`tensor_model_parallel=True`) is summed on every TP rank,
  a replicated one (norm weights) on TP rank 0 only;
* pipeline parallelism: each stage sums its own layers (tied embeddings, held by two stages, are
  refused with --log-params-norm; --log-num-zeros-in-grad is refused with PP > 1);
* data / Ulysses-sequence parallelism: every replica holds the same numbers, so the world-wide
  sum is divided by the number of replicas, except for ZeRO-3 weights, where each rank sums only
  its own partition (`ds_tensor`, without the padding of the last one).

Sums are in fp64 and all-reduced over the whole world (one collective per statistic).

params norm = sqrt(sum of squares) of the model's weights as they are after the step (the
working weights: bf16 in a bf16 run). num zeros = number of exactly-zero elements of the
reduced gradient that the optimizer is about to apply (DeepSpeed's `safe_get_full_grad` view of it:
the fp32 accumulation buffer under ZeRO and bf16, `param.grad` otherwise), taken just before the
optimizer step of the iterations that are logged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.parallel_state import all_reduce_values
from megatron.deepspeed_compat.partitions import full_grad, zero3_local


def _layout() -> tuple[int, int]:
    """(tensor-parallel rank, number of replicas of each element over data x sequence parallelism)."""
    if not dist.is_initialized():
        return 0, 1
    from megatron.core import parallel_state as ps  # noqa: PLC0415

    return ps.get_tensor_model_parallel_rank(), ps.get_sequence_data_parallel_world_size()


def _counted_here(p: torch.nn.Parameter, tp_rank: int) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """`total + value` on the device, in order: the bits of adding their floats on the host, without a host
    read (which waits for a GPU/XPU) per tensor."""
    return value if total is None else total + value.to(total.device)


def _read(totals: list[torch.Tensor | None]) -> list[float]:
    """The totals as floats (None: 0.0), in one host read."""
    held = [t for t in totals if t is not None]
    values = iter(torch.stack([t.to(held[0].device) for t in held]).tolist() if held else [])
    return [0.0 if t is None else next(values) for t in totals]


def params_norm(model: torch.nn.Module) -> float:
    """L2 norm of all weights of the model (every rank must call it: one all-reduce)."""
    tp_rank, replicas = _layout()
    full = part = None
    for p in model.parameters():
        if not _counted_here(p, tp_rank):
            continue
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition only
            part = _add(part, zero3_local(p).detach().double().square().sum())
        else:
            full = _add(full, p.detach().double().square().sum())
    full, part = all_reduce_values(_read([full, part]))
    return (full / replicas + part) ** 0.5


def num_zeros_in_grad(model: torch.nn.Module) -> int:
    """Zero elements of the reduced gradient (call between the last backward and the step, on every rank)."""
    tp_rank, replicas = _layout()
    zeros = None
    for p in model.parameters():
        if not p.requires_grad:
            continue
        g = full_grad(p)  # a collective under ZeRO: every rank, same order
        if g is not None and _counted_here(p, tp_rank):
            zeros = _add(zeros, g.numel() - torch.count_nonzero(g))
    (zeros,) = all_reduce_values(_read([zeros]))
    return int(round(zeros / replicas))


def watch_zeros_in_grad(engine, should_count) -> dict:
    """Make `engine.step` count the gradient's zeros first, at the gradient-accumulation boundary of
    the iterations `should_count(iteration)` selects. Returns the dict where the last count lands
    (`{"iteration": i, "num_zeros": n}`)."""
    last: dict = {}
    step = engine.step

    def counting_step(*a, **kw):
        iteration = int(engine.global_steps) + 1
        if engine.is_gradient_accumulation_boundary() and should_count(iteration):
            last.update(iteration=iteration, num_zeros=num_zeros_in_grad(engine.module))
        return step(*a, **kw)

    engine.step = counting_step
    return last
