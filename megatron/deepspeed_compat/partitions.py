"""Reading where DeepSpeed put each parameter: the layouts of its flat optimizer partitions and a
ZeRO-3 parameter's local part. The per-tensor optimizers (megatron/optimizer/partition.py) and the
weight statistics see whole tensors through these; the attributes read here are DeepSpeed's
bookkeeping, not public API, and tests/test_deepspeed_compat.py checks they still exist.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist


class PartitionMap(NamedTuple):
    """What one flat tensor of a DeepSpeed optimizer holds: pieces of `params` (whole `shapes`),
    each piece (index into params, first element in the whole tensor, first element in the flat
    tensor, numel); the other pieces live on the other ranks of `group` (None: all local)."""
    params: list
    shapes: list
    fragments: list
    group: Any


def _hp_layout(params: list, group) -> PartitionMap:
    """ZeRO 1/2 and DeepSpeed's bf16 optimizer: each model parameter's `_hp_mapping` names the
    part of it (lp_fragment_address) and where it sits in the flat partition (hp_fragment_address)."""
    frags = []
    for i, p in enumerate(params):
        m = getattr(p, "_hp_mapping", None)
        if m is not None and m.lp_fragment_address.numel > 0:
            frags.append((i, m.lp_fragment_address.start, m.hp_fragment_address.start, m.lp_fragment_address.numel))
    return PartitionMap(list(params), [p.shape for p in params], frags, group)


def _stage3_layout(zero, sub_group: int) -> PartitionMap:
    """ZeRO-3: every parameter is split across the group on its own (`ds_tensor`, partition_numel
    elements each, the last one short); a sub-group's flat tensor is its parameters' local parts
    laid end to end."""
    params, group = zero.fp16_groups[sub_group], zero._get_sub_group_process_group(sub_group)
    rank = dist.get_rank(group=group)
    frags, offset = [], 0
    for i, p in enumerate(params):
        per = p.partition_numel()
        n = _zero3_local_numel(p.ds_numel, per, rank)
        if n:
            frags.append((i, rank * per, offset, n))
        offset += per
    return PartitionMap(list(params), [p.ds_shape for p in params], frags, group)


def _zero3_local_numel(numel: int, per_rank: int, rank: int) -> int:
    """Elements of a ZeRO-3 parameter of `numel` elements that rank `rank` holds (`per_rank` each, the
    last partitions short or empty)."""
    return max(0, min(per_rank, numel - rank * per_rank))


def _contiguous_layout(params: list) -> PartitionMap:
    """DeepSpeed's fp16 optimizer at stage 0: one unpartitioned flat fp32 copy of each group."""
    frags, offset = [], 0
    for i, p in enumerate(params):
        frags.append((i, 0, offset, p.numel()))
        offset += p.numel()
    return PartitionMap(list(params), [p.shape for p in params], frags, None)


def partition_maps(zero) -> dict[int, PartitionMap]:
    """{id(flat tensor): PartitionMap} for the DeepSpeed optimizer `zero` (an engine's `.optimizer`);
    {} when the client optimizer holds the model's tensors itself."""
    if hasattr(zero, "single_partition_of_fp32_groups") and hasattr(zero, "bit16_groups"):  # ZeRO 1/2
        lay = {id(flat): _hp_layout(zero.bit16_groups[i], zero.real_dp_process_group[i])
               for i, flat in enumerate(zero.single_partition_of_fp32_groups)}
    elif hasattr(zero, "fp32_groups_flat_partition") and hasattr(zero, "bf16_groups"):  # bf16 at stage 0
        lay = {id(flat): _hp_layout(zero.bf16_groups[i], zero.real_dp_process_group[i])
               for i, flat in enumerate(zero.fp32_groups_flat_partition)}
    elif hasattr(zero, "fp32_partitioned_groups_flat") and hasattr(zero, "fp16_groups"):  # ZeRO 3
        lay = {id(flat): _stage3_layout(zero, i) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)}
    elif hasattr(zero, "fp32_groups_flat") and hasattr(zero, "fp16_groups"):  # fp16 at stage 0
        lay = {id(flat): _contiguous_layout(zero.fp16_groups[i]) for i, flat in enumerate(zero.fp32_groups_flat)}
    else:
        return {}
    return lay


def model_sync(zero) -> Callable[[], None] | None:
    """The function that copies the DeepSpeed optimizer `zero`'s fp32 masters into the model's
    weights (after an optimizer changed the masters outside its step); None without masters."""
    if hasattr(zero, "update_lp_params") and (hasattr(zero, "bit16_groups") or hasattr(zero, "bf16_groups")):
        return zero.update_lp_params  # ZeRO 1/2, bf16 at stage 0
    if hasattr(zero, "fp32_partitioned_groups_flat") and hasattr(zero, "fp16_groups"):  # ZeRO 3
        def sync() -> None:
            for lp, hp in zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat):
                if lp is not None and lp is not hp:
                    lp.data.copy_(hp.data)
        return sync
    if hasattr(zero, "fp32_groups_flat") and hasattr(zero, "fp16_groups"):  # fp16 at stage 0
        def sync_fp16() -> None:
            for i, flat in enumerate(zero.fp32_groups_flat):
                off = 0
                for p in zero.fp16_groups[i]:
                    p.data.copy_(flat.data[off:off + p.numel()].view_as(p))
                    off += p.numel()
        return sync_fp16
    return None


def zero3_local(p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's elements of a ZeRO-3 parameter (its `ds_tensor` partition without the last one's padding)."""
    part = p.ds_tensor
    size = part.ds_numel
    rank = dist.get_rank(group=p.ds_process_group) if dist.is_initialized() else 0
    return part.reshape(-1).narrow(0, 0, _zero3_local_numel(p.ds_numel, size, rank))


def full_grad(p: torch.nn.Parameter):
    """The reduced fp32 gradient of `p` (a collective under ZeRO: every rank, same order): ZeRO-1/2
    and the bf16 optimizer keep it in the flat partition (`_hp_mapping`), ZeRO-3 gathers it."""
    from deepspeed.utils import safe_get_full_grad  # noqa: PLC0415

    if getattr(p, "_hp_mapping", None) is not None and getattr(p, "ds_id", None) is None:
        return p.get_full_hp_grad()
    return safe_get_full_grad(p)
