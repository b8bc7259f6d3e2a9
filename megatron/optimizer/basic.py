"""torch.optim optimizers: adamw (default), adam, sgd."""
from __future__ import annotations

import torch

from megatron.optimizer import register_optimizer


def adam_kwargs(args) -> dict:
    return {"lr": args.lr, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_eps,
            "weight_decay": args.weight_decay}


@register_optimizer("adamw", help="torch.optim.AdamW, decoupled weight decay (default)")
def build_adamw(groups: list[dict], args) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, **adam_kwargs(args), foreach=True)


@register_optimizer("adam", help="torch.optim.Adam, L2 weight decay added to the gradient")
def build_adam(groups: list[dict], args) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, **adam_kwargs(args), foreach=True)


@register_optimizer("sgd", help="torch.optim.SGD with --sgd-momentum")
def build_sgd(groups: list[dict], args) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.sgd_momentum, weight_decay=args.weight_decay,
                           foreach=True)
