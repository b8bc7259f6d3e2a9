"""TP-aware RNG: named RNG states that a region of code can `fork` into.

Megatron's rule: the default generator has the same seed on every TP rank (so dropout on
activations that are replicated across the TP group draws the same mask everywhere), while
the "model-parallel" state has a different seed per TP rank (dropout on TP-split activations:
attention heads, sequence-parallel shards). `model_parallel_manual_seed(seed)` sets both up:

    default generator      seed                                        (same on all TP and SP ranks)
    "model-parallel-rng"   seed + 2718 + tp_rank + tp_size * sp_rank   (Megatron's offset)

Ulysses sequence parallelism (SP > 1) splits activations too: each SP rank holds another part
of the same sequences (and, inside attention, other heads), so dropout there runs under the
model-parallel state, which then differs per SP rank as well. At SP = 1 the seed is Megatron's
`seed + 2718 + tp_rank` exactly; SP rank 0 keeps it at any SP size. (Upstream Megatron-DeepSpeed
seeds by TP rank only, so its SP ranks drop the same positions of their shards.)

States are saved with the checkpoint (`get_states` / `set_states`). The tracker object lives
in `parallel_state` (the package's only module-level state).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.utils.checkpoint

from megatron.core import parallel_state as ps

MODEL_PARALLEL_RNG = "model-parallel-rng"
SEED_OFFSET = 2718


def _device_rng():
    """(get_state, set_state) of the default generator of the device the model runs on."""
    if torch.cuda.is_available():
        return torch.cuda.get_rng_state, torch.cuda.set_rng_state
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.xpu.get_rng_state, torch.xpu.set_rng_state
    return torch.get_rng_state, torch.set_rng_state


class RNGStatesTracker:
    """Named generator states; `fork(name)` runs a block with that state, then restores the
    default one (and keeps the advanced named state for the next fork)."""

    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}
        self.seeds: set[int] = set()

    def reset(self) -> None:
        self.states, self.seeds = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds:
            raise ValueError(f"seed {seed} already exists in the RNG tracker")
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        self.seeds.add(seed)
        get_state, set_state = _device_rng()
        saved = get_state()
        if get_state is torch.get_rng_state:
            torch.manual_seed(seed)
        else:
            _seed_device(seed)
        self.states[name] = get_state()
        set_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self.states:
            raise KeyError(f"RNG state {name!r} is not in the tracker (call model_parallel_manual_seed)")
        get_state, set_state = _device_rng()
        saved = get_state()
        set_state(self.states[name])
        try:
            yield
        finally:
            self.states[name] = get_state()
            set_state(saved)


def _seed_device(seed: int) -> None:
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    else:
        torch.xpu.manual_seed(seed)


def get_rng_tracker() -> RNGStatesTracker:
    tracker = ps.get_rng_tracker_slot()
    if tracker is None:
        tracker = RNGStatesTracker()
        ps.set_rng_tracker_slot(tracker)
    return tracker


def model_parallel_manual_seed(seed: int) -> None:
    """Seed the default generator with `seed` and the tracker's model-parallel state with
    `seed + 2718 + tp_rank + tp_size * sp_rank` (call on every rank after the parallel groups exist)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(seed)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, model_parallel_seed(seed))


def model_parallel_seed(seed: int) -> int:
    """This rank's model-parallel RNG seed (module docstring)."""
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return seed + SEED_OFFSET + tp_rank + tp_size * ps.get_sequence_parallel_rank()


def model_parallel_rng(active: bool = True):
    """Context for randomness on split activations (TP-split, or sequence shards): the tracker's
    model-parallel state when TP > 1 or Ulysses SP > 1 (and `active`), otherwise nothing (the
    default generator)."""
    if active and (ps.get_tensor_model_parallel_world_size() > 1 or ps.get_sequence_parallel_world_size() > 1):
        return get_rng_tracker().fork()
    return contextlib.nullcontext()


def _tracker_contexts():
    """Contexts for torch.utils.checkpoint: the recomputation runs with the tracker states the
    original forward started with (as the default generator is restored by torch itself), so
    dropout under `fork` draws the same masks twice."""
    tracker = get_rng_tracker()
    saved: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def forward_ctx():
        saved.update(tracker.get_states())
        yield

    @contextlib.contextmanager
    def recompute_ctx():
        current = tracker.get_states()
        tracker.set_states(saved)
        try:
            yield
        finally:
            tracker.set_states(current)

    return forward_ctx(), recompute_ctx()


def checkpoint(function, *args):
    """Activation checkpointing of `function(*args)`: its activations are dropped after the
    forward and recomputed in the backward (torch.utils.checkpoint, non-reentrant), with the
    default and TP RNG states of the original forward."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=_tracker_contexts)
