"""Lion (EvoLved Sign Momentum, Chen et al. 2023): sign of an interpolated momentum.

betas are ``--adam-beta1`` / ``--adam-beta2`` (as in Megatron-LM; Lion's paper uses 0.9, 0.99);
Lion wants an LR 3-10x smaller and a weight decay 3-10x larger than AdamW.
"""
from __future__ import annotations

import torch

from megatron.config import Config
from megatron.optimizer import register_optimizer
from megatron.optimizer.base import ElementwiseOptimizer


class Lion(ElementwiseOptimizer):
    """p <- p(1 - lr*wd) - lr*sign(b1*m + (1-b1)*g);  m <- b2*m + (1-b2)*g."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    buffers = ("exp_avg",)
    counts_steps = False

    def update(self, p, grad, state, g, t) -> None:
        b1, b2 = g["betas"]
        m = state["exp_avg"]
        p.mul_(1 - g["lr"] * g["weight_decay"])
        p.add_(m.lerp(grad, 1 - b1).sign_(), alpha=-g["lr"])
        m.lerp_(grad, 1 - b2)


@register_optimizer("lion", state_copies=1.0, help="Lion (sign momentum); betas from --adam-beta1/2, decoupled weight decay")
def build_lion(groups: list[dict], config: Config) -> torch.optim.Optimizer:
    o = config.optimizer
    return Lion(groups, lr=config.schedule.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay)
