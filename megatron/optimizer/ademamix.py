"""AdEMAMix (Pagliardini et al. 2024): Adam plus a slow EMA of the gradient weighted by alpha.

m1 <- lerp(m1, g, 1-b1); nu <- b2*nu + (1-b2)*g^2; m2 <- lerp(m2, g, 1-b3_t);
p <- p(1 - lr*wd) - lr*(m1/bc1 + alpha_t*m2) / (sqrt(nu)/sqrt(bc2) + eps), with the paper's
alpha and beta3 warmups over ``--ademamix-warmup-iters`` optimizer steps (none by default).
b1, b2, eps from ``--adam-*``; b3 and alpha from ``--ademamix-beta3`` / ``--ademamix-alpha``.
Weight decay is decoupled (AdamW-style).
"""
from __future__ import annotations

import math

import torch

from megatron.config import Config
from megatron.optimizer import register_optimizer
from megatron.optimizer.base import ElementwiseOptimizer


def alpha_at(step: int, alpha: float, warmup: int | None) -> float:
    return alpha if not warmup else min(step * alpha / warmup, alpha)


def beta3_at(step: int, beta1: float, beta3: float, warmup: int | None) -> float:
    if not warmup:
        return beta3
    l1, l3 = math.log(beta1), math.log(beta3)
    f = step / warmup
    return min(math.exp(l1 * l3 / ((1 - f) * l3 + f * l1)), beta3)


class AdEMAMix(ElementwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, warmup: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), alpha=alpha, warmup=warmup, eps=eps,
                                      weight_decay=weight_decay))

    buffers = ("exp_avg", "exp_avg_sq", "exp_avg_slow")

    def update(self, p, grad, state, g, t) -> None:
        b1, b2, b3 = g["betas"]
        lr = g["lr"]
        a_t, b3_t = alpha_at(t, g["alpha"], g["warmup"]), beta3_at(t, b1, b3, g["warmup"])
        m1, nu, m2 = state["exp_avg"], state["exp_avg_sq"], state["exp_avg_slow"]
        p.mul_(1 - lr * g["weight_decay"])
        m1.lerp_(grad, 1 - b1)
        nu.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m2.lerp_(grad, 1 - b3_t)
        denom = (nu.sqrt() / math.sqrt(1 - b2 ** t)).add_(g["eps"])
        update = (m1 / (1 - b1 ** t)).add_(m2, alpha=a_t)
        p.addcdiv_(update, denom, value=-lr)


@register_optimizer("ademamix", state_copies=3.0, help="AdEMAMix (Adam + slow EMA); --ademamix-beta3/-alpha/-warmup-iters")
def build_ademamix(groups: list[dict], config: Config) -> torch.optim.Optimizer:
    o = config.optimizer
    return AdEMAMix(groups, lr=config.schedule.lr, betas=(o.adam_beta1, o.adam_beta2, o.ademamix_beta3),
                    alpha=o.ademamix_alpha, warmup=o.ademamix_warmup_iters, eps=o.adam_eps,
                    weight_decay=o.weight_decay)
