"""The step loop shared by the element-wise optimizers written here (LAMB, ADOPT, Lion, AdEMAMix).

A subclass names its state buffers (zero-initialised like the parameter) and implements
`update(p, grad, state, group, t)` for one parameter; the closure, the skipping of parameters
without a gradient, the lazy state and the step counter (`state["step"]`, a float tensor as in
torch.optim, so DeepSpeed and universal checkpoints treat it like Adam's) live here once.
"""
from __future__ import annotations

from typing import Callable

import torch


class ElementwiseOptimizer(torch.optim.Optimizer):
    buffers: tuple[str, ...] = ()
    counts_steps: bool = True  # Lion keeps no step counter

    def update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, t: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    if self.counts_steps:
                        state["step"] = torch.zeros((), dtype=torch.float32)
                    for name in self.buffers:
                        state[name] = torch.zeros_like(p)
                t = 0
                if self.counts_steps:
                    state["step"] += 1
                    t = int(state["step"])
                self.update(p, p.grad, state, group, t)
        return loss
