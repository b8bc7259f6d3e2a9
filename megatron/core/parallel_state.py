"""Process groups of the run (the only module-level state of the package).

Ranks are laid out as Megatron does: tensor-parallel ranks are adjacent, then Ulysses
sequence-parallel (SP) ranks, then data-parallel, then pipeline stages
(rank = pp_rank * (dp * sp * tp) + dp_rank * (sp * tp) + sp_rank * tp + tp_rank).
With TP = PP = SP = 1 the data-parallel group is the whole world. The "sequence+data parallel"
group (the SP and DP ranks of one TP rank and stage) is where gradients are reduced under SP.

`collective_device()` is where the trainer's own small collectives (flags, sums, timings) put their
tensors: a backend serves only the devices in its map, and nccl (`cuda:nccl`) and torch's xccl
(`xpu:xccl`) have no CPU backend: a CPU tensor there fails with "No backend type associated with
device type cpu".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
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
    sp: int = 1  # Ulysses sequence parallelism (megatron/core/sequence_parallel.py)
    sp_group: object = None
    sdp_group: object = None  # sequence + data parallel

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def sp_rank(self) -> int:
        return (self.rank // self.tp) % self.sp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.sp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.sp * self.dp)


_STATE: ParallelState | None = None


def collective_device(group=None) -> torch.device:
    """The device for a small tensor that a collective over `group` (default: the world) reduces or
    gathers: the CPU where the group's backend serves it (gloo; oneCCL's ccl; no process group at all),
    else the accelerator it serves (nccl: the current CUDA device; xccl: the current XPU). The values
    are read back with `.tolist()` / `.item()`, which work on either."""
    if not dist.is_initialized():
        return torch.device("cpu")
    served = {entry.split(":")[0] for entry in dist.get_backend_config(group).split(",")}
    if "cpu" in served:
        return torch.device("cpu")
    for kind in ("cuda", "xpu"):
        if kind in served:
            return torch.device(kind, getattr(torch, kind).current_device())
    raise RuntimeError(f"the process group's backend ({dist.get_backend_config(group)}) serves neither the CPU nor "
                       "a CUDA/XPU device: use gloo, nccl, xccl or ccl (--distributed-backend)")


def all_reduce_values(values: list[float], op=None, group=None) -> list[float]:
    """`values` reduced over `group` (default: the world; `op` default SUM) in one float64 collective on
    `collective_device(group)`, as host floats; unchanged in a single process or when empty."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=group)
    return t.tolist()


def rank_groups(world_size: int, tp: int, pp: int, sp: int = 1) -> dict[str, list[list[int]]]:
    """The rank lists of every TP, SP, DP, SP+DP ("sdp") and PP group (pure function, used by the tests)."""
    if world_size % (tp * pp * sp):
        raise ValueError(f"world size {world_size} is not divisible by TP*PP*SP = {tp * pp * sp}")
    dp = world_size // (tp * pp * sp)
    stage = dp * sp * tp  # ranks per pipeline stage
    tp_groups = [list(range(s, s + tp)) for s in range(0, world_size, tp)]
    dp_groups = [[p * stage + d * sp * tp + s * tp + t for d in range(dp)]
                 for p in range(pp) for s in range(sp) for t in range(tp)]
    sp_groups = [[p * stage + d * sp * tp + s * tp + t for s in range(sp)]
                 for p in range(pp) for d in range(dp) for t in range(tp)]
    sdp_groups = [[p * stage + j * tp + t for j in range(dp * sp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[p * stage + j for p in range(pp)] for j in range(stage)]
    return {"tp": tp_groups, "dp": dp_groups, "pp": pp_groups, "sp": sp_groups, "sdp": sdp_groups}


def initialize_model_parallel(tp: int = 1, pp: int = 1, sp: int = 1, timeout=None) -> ParallelState:
    """Create the groups (every rank must call it, in the same order). `timeout` (a timedelta): of
    their collectives (new_group's default is the backend's, 30 min for gloo, not init's)."""
    global _STATE
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    groups = rank_groups(world, tp, pp, sp)
    state = ParallelState(world_size=world, rank=rank, tp=tp, pp=pp, dp=world // (tp * pp * sp), sp=sp)
    for kind in ("tp", "dp", "pp") + (("sp", "sdp") if sp > 1 else ()):  # SP = 1: sdp = dp, no SP group
        for ranks in groups[kind]:
            # new_group is collective: all ranks create all groups; keep the one we belong to.
            g = ((dist.group.WORLD if len(ranks) == world else dist.new_group(ranks, timeout=timeout))
                 if dist.is_initialized() else None)
            if rank in ranks:
                setattr(state, f"{kind}_group", g)
    if sp == 1:
        state.sdp_group = state.dp_group
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
    index = (state.pp_rank * state.sp + state.sp_rank) * state.tp + state.tp_rank
    return rank_groups(state.world_size, state.tp, state.pp, state.sp)["dp"][index]


# Ulysses sequence parallelism (1 / rank 0 / no group before initialization).
def get_sequence_parallel_world_size() -> int:
    return _STATE.sp if _STATE is not None else 1


def get_sequence_parallel_rank() -> int:
    return _STATE.sp_rank if _STATE is not None else 0


def get_sequence_parallel_group():
    return _STATE.sp_group if _STATE is not None else None


def get_sequence_data_parallel_group():
    """SP and DP ranks together: DeepSpeed reduces (and ZeRO partitions) gradients over it."""
    return get_state().sdp_group


def get_sequence_data_parallel_world_size() -> int:
    return get_state().sp * get_state().dp


def get_sequence_data_parallel_rank() -> int:
    state = get_state()
    return state.dp_rank * state.sp + state.sp_rank


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
    # Ulysses: gradients are summed over SP and averaged over DP (the engine divides by sdp / sp)
    get_sequence_parallel_group = staticmethod(get_sequence_parallel_group)
    get_sequence_parallel_rank = staticmethod(get_sequence_parallel_rank)
    get_sequence_parallel_world_size = staticmethod(get_sequence_parallel_world_size)
    get_sequence_data_parallel_group = staticmethod(get_sequence_data_parallel_group)
    get_sequence_data_parallel_rank = staticmethod(get_sequence_data_parallel_rank)
    get_sequence_data_parallel_world_size = staticmethod(get_sequence_data_parallel_world_size)


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
