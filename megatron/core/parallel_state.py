"""Process groups of the run (the only module-level state of the package).

Ranks are laid out as Megatron does: tensor-parallel ranks are adjacent, then
data-parallel, then pipeline stages (rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank).
With TP = PP = 1 the data-parallel group is the whole world.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class ParallelState:
    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)


_STATE: ParallelState | None = None


def rank_groups(world_size: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """The rank lists of every TP, DP and PP group (pure function, used by the tests)."""
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by TP*PP = {tp * pp}")
    dp = world_size // (tp * pp)
    tp_groups = [list(range(s, s + tp)) for s in range(0, world_size, tp)]
    dp_groups = [[p * dp * tp + d * tp + t for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[p * dp * tp + j for p in range(pp)] for j in range(dp * tp)]
    return {"tp": tp_groups, "dp": dp_groups, "pp": pp_groups}


def initialize_model_parallel(tp: int = 1, pp: int = 1) -> ParallelState:
    """Create the groups (every rank must call it, in the same order)."""
    global _STATE
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    groups = rank_groups(world, tp, pp)
    state = ParallelState(world_size=world, rank=rank, tp=tp, pp=pp, dp=world // (tp * pp))
    for kind in ("tp", "dp", "pp"):
        for ranks in groups[kind]:
            # new_group is collective: all ranks create all groups; keep the one we belong to.
            g = (dist.group.WORLD if len(ranks) == world else dist.new_group(ranks)) if dist.is_initialized() else None
            if rank in ranks:
                setattr(state, f"{kind}_group", g)
    _STATE = state
    return state


def get_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("parallel state is not initialized: call megatron.initialize first")
    return _STATE


def get_data_parallel_group():
    return get_state().dp_group


def get_data_parallel_rank() -> int:
    return get_state().dp_rank


def get_data_parallel_world_size() -> int:
    return get_state().dp


def destroy_model_parallel() -> None:
    global _STATE
    _STATE = None
