"""Optimizer-state statistics (`--log-optimizer-states-to-tensorboard`), computed from the real state.

Upstream looked the moments up by the wrong key, so its variance/momentum statistics were
always 0 (upstream-spec §11.2). Here the torch optimizer is found under DeepSpeed's wrappers
(`engine.optimizer` is a ZeRO or bf16 wrapper whose `.optimizer` is the torch optimizer over
flat fp32 partitions), every tensor this rank holds is reduced locally, and the partial sums
are all-reduced over the data-parallel group when the state is partitioned (ZeRO 1-3).
When every rank holds the full state (no ZeRO), no reduction is done (it would count it twice).

Statistics (names as upstream's `optimizer/*` keys): for weight (the master weights), momentum
(`exp_avg`, or `momentum_buffer` for SGD/Muon), variance (`exp_avg_sq`) and variance_sqrt
(its element-wise square root): `_l2` (Euclidean norm), `_l1` (sum of absolute values) and
`_abs_max`. A statistic is present only if the optimizer keeps that state.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron.core.parallel_state import all_reduce_values

MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")
VARIANCE_KEYS = ("exp_avg_sq",)


def inner_torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO stage 1/2/3, BF16_Optimizer...)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 5:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer found inside {type(optimizer).__name__}")
    return optimizer


def _first_key(state: dict, keys: tuple[str, ...]):
    for k in keys:
        v = state.get(k)
        if isinstance(v, torch.Tensor) and v.numel() > 0:
            return v
    return None


def local_sums(optimizer: torch.optim.Optimizer) -> tuple[dict[str, list[float]], int]:
    """Per statistic group: [sum of squares, sum of |x|, max |x|] over this rank's tensors, and
    the number of weight elements this rank holds."""
    acc: dict[str, torch.Tensor] = {}  # fp64 on the tensors' device: one host read in all, not three per tensor
    numel = 0

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().float()
        s = acc.get(name)
        if s is None:
            s = acc[name] = torch.zeros(3, dtype=torch.float64, device=t.device)
        s[0] += torch.sum(t * t).to(s)
        s[1] += torch.sum(t.abs()).to(s)
        s[2] = torch.fmax(s[2], t.abs().max().to(s))  # as Python's max(s, x): a NaN x leaves s

    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.numel() == 0:
                continue
            numel += p.numel()
            add("weight", p.data)
            st = optimizer.state.get(p, {})
            m = _first_key(st, MOMENTUM_KEYS)
            if m is not None:
                add("momentum", m)
            v = _first_key(st, VARIANCE_KEYS)
            if v is not None:
                add("variance", v)
                add("variance_sqrt", v.clamp(min=0).sqrt())
    rows = torch.stack(list(acc.values())).tolist() if acc else []
    return dict(zip(acc, rows)), numel


def optimizer_state_stats(optimizer, model_numel: int | None = None, group=None) -> dict[str, float]:
    """{"weight_l2": ..., "momentum_l1": ..., "variance_sqrt_abs_max": ...} over the whole model.

    `optimizer`: a torch optimizer or a DeepSpeed wrapper. `model_numel`: the number of model
    parameters; a rank holding fewer weight elements than that holds a partition, and the
    sums are all-reduced over `group` (the data-parallel group). Collective when partitioned:
    every rank of `group` must call it."""
    opt = inner_torch_optimizer(optimizer)
    acc, numel = local_sums(opt)
    names = ["weight", "momentum", "variance", "variance_sqrt"]
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    partitioned = world > 1 and (model_numel is None or numel < model_numel)
    if world > 1:
        # every rank must take part even if it holds no state of some kind; agree on the kinds first
        flags = all_reduce_values([1.0 if n in acc else 0.0 for n in names], op=dist.ReduceOp.MAX, group=group)
        present = [n for n, f in zip(names, flags) if f > 0]
    else:
        present = [n for n in names if n in acc]
    sums = [acc.get(n, [0.0, 0.0, 0.0])[i] for n in present for i in (0, 1)]
    maxes = [acc.get(n, [0.0, 0.0, 0.0])[2] for n in present]
    if partitioned:
        sums = all_reduce_values(sums, group=group)
        maxes = all_reduce_values(maxes, op=dist.ReduceOp.MAX, group=group)
    out: dict[str, float] = {}
    for k, n in enumerate(present):
        out[f"{n}_l2"] = math.sqrt(float(sums[2 * k]))
        out[f"{n}_l1"] = float(sums[2 * k + 1])
        out[f"{n}_abs_max"] = float(maxes[k])
    return out
