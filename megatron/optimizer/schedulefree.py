"""Schedule-free AdamW / SGD (Defazio et al. 2024) from the `schedulefree` package.

The loop switches the optimizer to its averaged weights (``optimizer.eval()``) around every
evaluation and checkpoint save and back (``optimizer.train()``) afterwards (upstream never did,
so evaluation and checkpoints used the wrong point). Warmup is the package's own
(``warmup_steps = --lr-warmup-iters``); ``--schedulefree-for-each`` selects its foreach kernels.
The swap changes the optimizer's weights in place; under ZeRO 1/2 and DeepSpeed's bf16/fp16
optimizers those are the fp32 master partitions, so the loop then copies them into the model's
weights (`OptimizerHooks`, megatron/optimizer/partition.py). ZeRO-3 is refused: its client
optimizer holds no parameters between steps, so there is nothing to swap.
"""
from __future__ import annotations

from megatron.config import Config
from megatron.optimizer import needs_module, register_optimizer

_need = needs_module("schedulefree", "pip install schedulefree", "the schedulefree package")


def check_schedulefree(config: Config) -> list[str]:
    errs = _need(config)
    if int(config.parallel.zero_stage) == 3:
        errs.append(f"--optimizer {config.optimizer.optimizer} swaps to its averaged weights for evaluation and "
                    "checkpoints, which ZeRO-3's optimizer cannot do between steps: use --zero-stage 1 or 2")
    return errs


def _training(opt):
    """The optimizer in train mode. `train()` touches `state[p]` of every parameter it holds now (the
    model's); under ZeRO DeepSpeed then hands it flat partitions instead, and those empty entries keyed
    by parameters it no longer holds would break `state_dict()` at the first checkpoint: drop them."""
    opt.train()
    for p in [p for p, st in opt.state.items() if not st]:
        del opt.state[p]
    return opt


def _common(config: Config) -> dict:
    return dict(lr=config.schedule.lr, weight_decay=config.optimizer.weight_decay,
                warmup_steps=int(config.schedule.lr_warmup_iters), foreach=bool(config.optimizer.schedulefree_for_each))


@register_optimizer("adamwschedulefree", check=check_schedulefree,
                    help="schedulefree.AdamWScheduleFree (averaged weights used for eval and checkpoints)")
def build_adamw_sf(groups: list[dict], config: Config):
    import schedulefree  # noqa: PLC0415

    o = config.optimizer
    return _training(schedulefree.AdamWScheduleFree(groups, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                                    **_common(config)))


@register_optimizer("sgdschedulefree", check=check_schedulefree, state_copies=1.0,
                    help="schedulefree.SGDScheduleFree with --sgd-momentum")
def build_sgd_sf(groups: list[dict], config: Config):
    import schedulefree  # noqa: PLC0415

    return _training(schedulefree.SGDScheduleFree(groups, momentum=config.optimizer.sgd_momentum, **_common(config)))
