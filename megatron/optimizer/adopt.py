"""ADOPT (Taniguchi et al. 2024): normalize the gradient by the *previous* second moment.

Variant (as upstream ALCF and pytorch-optimizer's `ADOPT`): the first step only initializes
v = g^2; afterwards g/max(sqrt(v), eps) is clipped to +-step^0.25, m <- lerp(m, ., 1-b1),
p <- p - lr*m, then v <- b2*v + (1-b2)*g^2. Weight decay is L2 (added to the gradient), as
upstream calls it (``decouple=False``). betas / eps from ``--adam-beta1/2``, ``--adam-eps``.
"""
from __future__ import annotations

import torch

from megatron.config import Config
from megatron.optimizer import register_optimizer
from megatron.optimizer.base import ElementwiseOptimizer


class ADOPT(ElementwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.9999), eps: float = 1e-6,
                 weight_decay: float = 0.0, decouple: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decouple=decouple))

    buffers = ("exp_avg", "exp_avg_sq")

    def update(self, p, grad, state, g, t) -> None:
        b1, b2 = g["betas"]
        lr, wd = g["lr"], g["weight_decay"]
        if wd:
            if g["decouple"]:
                p.mul_(1 - lr * wd)
            else:
                grad = grad.add(p, alpha=wd)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if t == 1:
            v.addcmul_(grad, grad)
            return
        normed = grad / v.sqrt().clamp(min=g["eps"])
        clip = t ** 0.25
        normed.clamp_(-clip, clip)
        m.lerp_(normed, 1 - b1)
        p.add_(m, alpha=-lr)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)


@register_optimizer("adopt", help="ADOPT (clip step^0.25, L2 weight decay); betas/eps from --adam-*")
def build_adopt(groups: list[dict], config: Config) -> torch.optim.Optimizer:
    o = config.optimizer
    return ADOPT(groups, lr=config.schedule.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                 weight_decay=o.weight_decay)
