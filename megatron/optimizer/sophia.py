"""SophiaG (Liu et al. 2023) with its Hessian estimate really refreshed.

Step: p <- p(1 - lr*wd); m <- b1*m + (1-b1)*g; p <- p - lr*sign(m)*min(|m|/(rho*bs*h + 1e-15), 1),
bs = tokens per global batch. Every ``--sophiag-hessian-interval`` iterations (k, default 10; the
first refresh is after iteration 1) `after_step` runs one extra forward/backward on the
iteration's micro-batches with labels *sampled* from the model's own softmax (the
Gauss-Newton-Bartlett estimator) and updates h <- b2*h + (1-b2)*g_hat^2 (all-reduced over
ranks). Upstream never called its `update_hessian`, so h stayed 0 and the update was
lr*sign(m). Needs the optimizer to hold the model's weights: ZeRO 0 without --bf16.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.optimizer import arg, register_optimizer
from megatron.optimizer.base import ElementwiseOptimizer


class SophiaG(ElementwiseOptimizer):
    buffers = ("exp_avg", "hessian")
    counts_steps = False
    counters = ("hessian_updates",)

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 1e-1, bs: int = 5120, hessian_interval: int = 10) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, bs=bs))
        self.hessian_interval = int(hessian_interval)
        self.hessian_updates = 0

    def _state(self, p):
        state = self.state[p]
        for name in self.buffers:
            if name not in state:
                state[name] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self, grads: dict | None = None) -> None:
        """h <- b2*h + (1-b2)*g^2 with g the sampled-label gradient (`grads[p]`, else p.grad)."""
        for g in self.param_groups:
            b2 = g["betas"][1]
            for p in g["params"]:
                gh = grads.get(p) if grads is not None else p.grad
                if gh is None:
                    continue
                self._state(p)["hessian"].mul_(b2).addcmul_(gh, gh, value=1 - b2)
        self.hessian_updates += 1

    def update(self, p: torch.Tensor, grad: torch.Tensor, state: dict, g: dict, t: int) -> None:
        m, h = state["exp_avg"], state["hessian"]
        p.mul_(1 - g["lr"] * g["weight_decay"])
        m.mul_(g["betas"][0]).add_(grad, alpha=1 - g["betas"][0])
        ratio = (m.abs() / (g["rho"] * g["bs"] * h + 1e-15)).clamp(max=1)
        p.addcmul_(m.sign(), ratio, value=-g["lr"])

    def refresh_due(self, iteration: int) -> bool:
        return (iteration - 1) % self.hessian_interval == 0

    def after_step(self, iteration: int, module: torch.nn.Module, replay: Callable[[], Iterable]) -> dict:
        if not self.refresh_due(iteration):
            return {}
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        grads = sampled_label_gradient(module, params, replay)
        self.update_hessian(dict(zip(params, grads)))
        return {"sophiag_hessian_mean": float(sum(self.state[p]["hessian"].sum() for p in params)
                                              / sum(p.numel() for p in params))}


def sampled_label_gradient(module: torch.nn.Module, params: list, replay: Callable[[], Iterable]) -> list:
    """Gradient of the masked-mean cross-entropy against labels sampled from the model's own
    predictive distribution, averaged over the micro-batches of `replay()` and over ranks."""
    batches = list(replay())
    grads = [torch.zeros_like(p) for p in params]
    for tokens, mask in batches:
        with torch.enable_grad():
            logits = module(tokens).float()
            with torch.no_grad():
                y = torch.distributions.Categorical(logits=logits).sample()
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
            loss = (ce * mask).sum() / mask.sum().clamp(min=1.0) / len(batches)
            gs = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, gp in zip(grads, gs):
            if gp is not None:
                acc.add_(gp)
    if dist.is_initialized() and dist.get_world_size() > 1:
        for gp in grads:
            dist.all_reduce(gp)
            gp.div_(dist.get_world_size())
    return grads


def check_sophiag(args) -> list[str]:
    errs = []
    if int(arg(args, "zero_stage", 0)) >= 1 or arg(args, "bf16", False):
        errs.append("--optimizer sophiag refreshes its Hessian estimate per parameter, which needs the optimizer to "
                    "hold the model's weights: use --zero-stage 0 without --bf16")
    if int(arg(args, "sophiag_hessian_interval", 10)) < 1:
        errs.append(f"--sophiag-hessian-interval must be >= 1 (got {args.sophiag_hessian_interval})")
    return errs


@register_optimizer("sophiag", check=check_sophiag,
                    help="SophiaG with a Gauss-Newton-Bartlett Hessian refresh every --sophiag-hessian-interval steps")
def build_sophiag(groups: list[dict], args) -> torch.optim.Optimizer:
    bs = int(arg(args, "global_batch_size", 1)) * int(arg(args, "seq_length", 1))
    return SophiaG(groups, lr=args.lr, betas=(arg(args, "sophiag_beta1", 0.9), arg(args, "sophiag_beta2", 0.95)),
                   rho=arg(args, "sophiag_rho", 0.01), weight_decay=args.weight_decay, bs=bs,
                   hessian_interval=arg(args, "sophiag_hessian_interval", 10))
