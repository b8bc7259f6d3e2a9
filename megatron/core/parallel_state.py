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


def get_data_parallel_group_ranks() -> list[int]:
    state = get_state()
    return rank_groups(state.world_size, state.tp, state.pp)["dp"][state.pp_rank * state.tp + state.tp_rank]


# Tensor parallelism. These work before initialization too (one rank, no group), so the model
# can be built and tested without a process group.
def get_tensor_model_parallel_world_size() -> int:
    return _STATE.tp if _STATE is not None else 1


def get_tensor_model_parallel_rank() -> int:
    return _STATE.tp_rank if _STATE is not None else 0


def get_tensor_model_parallel_group():
    return _STATE.tp_group if _STATE is not None else None


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 of this rank's TP group."""
    return _STATE.rank - _STATE.tp_rank if _STATE is not None else 0


def get_pipeline_model_parallel_world_size() -> int:
    return _STATE.pp if _STATE is not None else 1


def get_pipeline_model_parallel_rank() -> int:
    return _STATE.pp_rank if _STATE is not None else 0


class DeepSpeedMPU:
    """The `mpu` object `deepspeed.initialize(mpu=...)` queries: with it, ZeRO partitions and
    reduces over the data-parallel group only, gradient clipping sums the norms of TP-split
    parameters over the model-parallel group (replicated ones counted once), and checkpoints
    are written per TP rank (`mp_rank_XX`). Model parallel = tensor parallel here (PP = 1)."""

    get_data_parallel_group = staticmethod(get_data_parallel_group)
    get_data_parallel_rank = staticmethod(get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(get_data_parallel_world_size)
    get_data_parallel_group_ranks = staticmethod(get_data_parallel_group_ranks)
    get_model_parallel_group = staticmethod(get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_world_size = staticmethod(get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_rank = staticmethod(get_pipeline_model_parallel_rank)


# The TP-aware RNG tracker (megatron.core.tensor_parallel.random) keeps its states here.
_RNG_TRACKER = None


def get_rng_tracker_slot():
    return _RNG_TRACKER


def set_rng_tracker_slot(tracker) -> None:
    global _RNG_TRACKER
    _RNG_TRACKER = tracker


def destroy_model_parallel() -> None:
    global _STATE, _RNG_TRACKER
    _STATE = None
    _RNG_TRACKER = None
