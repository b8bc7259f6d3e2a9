"""torch.optim optimizers: adamw (default), adam, sgd."""
from __future__ import annotations

import torch

from megatron.config import Config
from megatron.optimizer import register_optimizer


def adam_kwargs(config: Config) -> dict:
    o = config.optimizer
    return {"lr": config.schedule.lr, "betas": (o.adam_beta1, o.adam_beta2), "eps": o.adam_eps,
            "weight_decay": o.weight_decay}


# torch's fused Adam/AdamW kernel: one pass over memory per step instead of foreach's ~10. On a
# 25M-element fp32 tensor on 2 CPU cores a step takes 0.05 s instead of 0.38 s (bench/README.md).
# CPU, CUDA and XPU have it; the result equals foreach's up to float rounding.
FUSED = {"fused": True}


@register_optimizer("adamw", help="torch.optim.AdamW, decoupled weight decay (default)")
def build_adamw(groups: list[dict], config: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, **adam_kwargs(config), **FUSED)


@register_optimizer("adam", help="torch.optim.Adam, L2 weight decay added to the gradient")
def build_adam(groups: list[dict], config: Config) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, **adam_kwargs(config), **FUSED)


@register_optimizer("sgd", state_copies=1.0, help="torch.optim.SGD with --sgd-momentum")
def build_sgd(groups: list[dict], config: Config) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=config.schedule.lr, momentum=config.optimizer.sgd_momentum,
                           weight_decay=config.optimizer.weight_decay, foreach=True)


@register_optimizer("ds.adamw", help="DeepSpeed's AdamW, built by DeepSpeed from an \"optimizer\" block (torch AdamW "
                    "on CPU, FusedAdam on CUDA; the launcher writes the block for OPT=ds.adamw); same math as adamw")
def build_ds_adamw(groups: list[dict], config: Config):
    from megatron.optimizer import DeepSpeedOptimizer  # noqa: PLC0415

    # torch_adam: torch.optim.AdamW (DeepSpeed's FusedAdam is a CUDA kernel; on a CPU it would be JIT-built)
    o = config.optimizer
    params = {"lr": config.schedule.lr, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps,
              "weight_decay": o.weight_decay, "torch_adam": not torch.cuda.is_available()}
    return DeepSpeedOptimizer(config={"type": "AdamW", "params": params}, param_groups=groups)
