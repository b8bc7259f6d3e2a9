"""Schedule-free AdamW / SGD (Defazio et al. 2024) from the `schedulefree` package.

The loop switches the optimizer to its averaged weights (``optimizer.eval()``) around every
evaluation and checkpoint save and back (``optimizer.train()``) afterwards (upstream never did,
so evaluation and checkpoints used the wrong point). Warmup is the package's own
(``warmup_steps = --lr-warmup-iters``); ``--schedulefree-for-each`` selects its foreach kernels.
The swap changes the model's weights in place, so it needs ZeRO 0 without --bf16.
"""
from __future__ import annotations

from megatron.optimizer import arg, needs_module, register_optimizer

_need = needs_module("schedulefree", "pip install schedulefree", "the schedulefree package")


def check_schedulefree(args) -> list[str]:
    errs = _need(args)
    if int(arg(args, "zero_stage", 0)) >= 1 or arg(args, "bf16", False):
        errs.append(f"--optimizer {args.optimizer} swaps the model's weights for evaluation and checkpoints, which "
                    "needs the optimizer to hold them: use --zero-stage 0 without --bf16")
    return errs


def _common(args) -> dict:
    return dict(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=int(arg(args, "lr_warmup_iters", 0)),
                foreach=bool(arg(args, "schedulefree_for_each", False)))


@register_optimizer("adamwschedulefree", check=check_schedulefree,
                    help="schedulefree.AdamWScheduleFree (averaged weights used for eval and checkpoints)")
def build_adamw_sf(groups: list[dict], args):
    import schedulefree  # noqa: PLC0415

    opt = schedulefree.AdamWScheduleFree(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                         **_common(args))
    opt.train()
    return opt


@register_optimizer("sgdschedulefree", check=check_schedulefree,
                    help="schedulefree.SGDScheduleFree with --sgd-momentum")
def build_sgd_sf(groups: list[dict], args):
    import schedulefree  # noqa: PLC0415

    opt = schedulefree.SGDScheduleFree(groups, momentum=args.sgd_momentum, **_common(args))
    opt.train()
    return opt
