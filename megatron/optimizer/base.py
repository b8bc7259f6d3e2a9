"""The per-parameter step loop shared by the optimizers written here (LAMB, ADOPT, Lion, AdEMAMix,
and both halves of our ZeRO-0 Muon).

A subclass names its state buffers (zero-initialised like the parameter) and implements
`update(p, grad, state, group, t)` for one parameter; the closure, the skipping of parameters
without a gradient, the lazy state and the step counter (`state["step"]`, a float tensor as in
torch.optim, so DeepSpeed and universal checkpoints treat it like Adam's) live here once.
An optimizer whose groups keep different state (Muon: a momentum buffer on its 2-D matrices,
AdamW's moments and step on the others) overrides `group_buffers` / `group_counts_steps`.
"""
from __future__ import annotations

from typing import Callable

import torch


class ElementwiseOptimizer(torch.optim.Optimizer):
    buffers: tuple[str, ...] = ()
    counts_steps: bool = True  # Lion keeps no step counter
    # attributes (dotted paths; a missing object is skipped) saved in state_dict()["counters"] so that a
    # resumed run continues them (SophiaG's Hessian refreshes, MuonClip's clipped heads). DeepSpeed saves
    # this state_dict whole at ZeRO-0 and in each ZeRO-1/2 rank file (non-elastic layout, the default);
    # universal checkpoints keep only the per-parameter state.
    counters: tuple[str, ...] = ()

    def _counter_owner(self, path: str):
        *owners, name = path.split(".")
        obj = self
        for o in owners:
            obj = getattr(obj, o, None)
        return obj, name

    def state_dict(self) -> dict:
        sd = super().state_dict()
        owned = [(path, *self._counter_owner(path)) for path in self.counters]
        sd["counters"] = {path: getattr(obj, name) for path, obj, name in owned if obj is not None}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("counters", {})  # (absent in checkpoints written before counters were kept)
        super().load_state_dict(state_dict)
        for path, value in saved.items():
            obj, name = self._counter_owner(path)
            if obj is not None:
                setattr(obj, name, value)

    def update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, t: int) -> None:
        raise NotImplementedError

    def group_buffers(self, group: dict) -> tuple[str, ...]:
        """Names of the per-parameter state buffers of `group`'s parameters."""
        return self.buffers

    def group_counts_steps(self, group: dict) -> bool:
        """Whether `group`'s parameters keep a step counter (`t` passed to `update`, else 0)."""
        return self.counts_steps

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            counts = self.group_counts_steps(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    if counts:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                    for name in self.group_buffers(group):
                        state[name] = torch.zeros_like(p)
                t = 0
                if counts:
                    state["step"] += 1
                    t = int(state["step"])
                self.update(p, p.grad, state, group, t)
        return loss
