"""Optimizer registry: one name -> one builder, registered next to its implementation.

Adding an optimizer is one decorated function (plus its test):

    @register_optimizer("myopt", help="one line shown in --help")
    def _build_myopt(param_groups, args):
        return MyOpt(param_groups, lr=args.lr, ...)

`--optimizer` choices and its --help text are generated from this registry, so they never
go out of date. Builders receive parameter groups from `get_param_groups` (no weight decay
for 1-D parameters and biases; per-group `lr_mult`/`wd_mult` that the LR scheduler applies
every step) and the parsed arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

Builder = Callable[[list[dict], object], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    build: Builder
    help: str


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register_optimizer(name: str, *, help: str = "") -> Callable[[Builder], Builder]:
    """Decorator registering `builder(param_groups, args) -> torch.optim.Optimizer` under `name`."""

    def deco(builder: Builder) -> Builder:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is registered twice")
        OPTIMIZERS[name] = OptimizerEntry(name, builder, help)
        return builder

    return deco


def optimizer_names() -> list[str]:
    return list(OPTIMIZERS)


def optimizer_help() -> str:
    return "; ".join(f"{e.name}: {e.help}" if e.help else e.name for e in OPTIMIZERS.values())


def get_param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    lr_mult: float = 1.0,
) -> list[dict]:
    """Split parameters into a weight-decay group and a no-weight-decay group.

    1-D tensors (norm weights) and biases get no weight decay, as in Megatron. Each group
    carries `wd_mult` (0 or 1) and `lr_mult`, which the scheduler multiplies in every step.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "wd_mult": 1.0, "lr_mult": lr_mult, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "wd_mult": 0.0, "lr_mult": lr_mult, "name": "no_decay"})
    return groups


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """Build the optimizer named by `args.optimizer` for `model`'s parameters."""
    try:
        entry = OPTIMIZERS[args.optimizer]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {args.optimizer!r}; valid names: {', '.join(OPTIMIZERS)}"
        ) from None
    groups = get_param_groups(model.named_parameters())
    for g in groups:  # the scheduler sets the real values before the first step
        g["lr"] = args.lr
        g["weight_decay"] = args.weight_decay * g["wd_mult"]
    return entry.build(groups, args)


# --------------------------------------------------------------------------- built-in entries
# torch.optim implementations; `foreach` keeps the step vectorised on every device.


@register_optimizer("adamw", help="torch.optim.AdamW, decoupled weight decay (default)")
def _build_adamw(groups: list[dict], args) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
        weight_decay=args.weight_decay, foreach=True,
    )


@register_optimizer("adam", help="torch.optim.Adam, L2 weight decay added to the gradient")
def _build_adam(groups: list[dict], args) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
        weight_decay=args.weight_decay, foreach=True,
    )


@register_optimizer("sgd", help="torch.optim.SGD with --sgd-momentum")
def _build_sgd(groups: list[dict], args) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups, lr=args.lr, momentum=args.sgd_momentum, weight_decay=args.weight_decay, foreach=True
    )
