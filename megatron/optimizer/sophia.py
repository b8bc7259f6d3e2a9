"""SophiaG (Liu et al. 2023) with its Hessian estimate really refreshed.

Step: p <- p(1 - lr*wd); m <- b1*m + (1-b1)*g; p <- p - lr*sign(m)*min(|m|/(rho*bs*h + 1e-15), 1),
bs = tokens per global batch. Every ``--sophiag-hessian-interval`` iterations (k, default 10; the
first refresh is after iteration 1) `after_step` runs one extra forward/backward on the
iteration's micro-batches with labels *sampled* from the model's own softmax (the
Gauss-Newton-Bartlett estimator) and updates h <- b2*h + (1-b2)*g_hat^2 (all-reduced over
ranks; the labels come from a generator seeded by seed, iteration and micro-batch index,
`sample_labels`, so the estimate is the same whatever the number of ranks). Upstream never called its `update_hessian`, so h stayed 0 and the update was
lr*sign(m). Under ZeRO 1/2 and DeepSpeed's bf16/fp16 optimizers the optimizer holds flat
partitions: the whole-tensor estimate g_hat^2 is cut to this rank's fragments
(megatron/optimizer/partition.py), so every stage computes the single-rank update. ZeRO-3 is
refused (the extra backward needs the model's whole weights).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.config import Config
from megatron.core.parallel_state import all_reduce_values
from megatron.optimizer import register_optimizer
from megatron.optimizer.base import ElementwiseOptimizer
from megatron.optimizer.partition import PartitionedWeights


class SophiaG(PartitionedWeights, ElementwiseOptimizer):
    buffers = ("exp_avg", "hessian")
    counts_steps = False
    counters = ("hessian_updates",)

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 1e-1, bs: int = 5120, hessian_interval: int = 10, seed: int = 1234) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, bs=bs))
        self.hessian_interval = int(hessian_interval)
        self.seed = int(seed)
        self.hessian_updates = 0

    def _state(self, p):
        state = self.state[p]
        for name in self.buffers:
            if name not in state:
                state[name] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self, grads: dict | None = None) -> None:
        """h <- b2*h + (1-b2)*g^2 with g the sampled-label gradient (`grads[model parameter]`,
        whole tensors, cut to the fragments this optimizer holds; else p.grad)."""
        for g in self.param_groups:
            b2 = g["betas"][1]
            for p in g["params"]:
                if grads is None:
                    gh = p.grad
                else:
                    layout = self.layout(p)
                    if any(grads.get(q) is None for q in layout.params):
                        continue
                    gh = layout.scatter([grads[q] for q in layout.params], like=p)
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

    def after_step(self, iteration: int, module: torch.nn.Module, replay: Callable[[], Iterable],
                   whole_batch: bool = False) -> dict:
        """`whole_batch`: `replay()` yields every micro-batch of the global batch (one process
        standing for all data-parallel ranks, as a reference run does)."""
        if not self.refresh_due(iteration):
            return {}
        params = [q for q in self.model_params() if q.requires_grad]
        grads = sampled_label_gradient(module, params, replay, self.seed, iteration, whole_batch)
        self.update_hessian(dict(zip(params, grads)))
        flats = [p for g in self.param_groups for p in g["params"]]
        hessian, count = all_reduce_values([float(sum(self.state[p]["hessian"].sum() for p in flats)),
                                            float(sum(f.numel for p in flats for f in self.layout(p).fragments))])
        return {"sophiag_hessian_mean": hessian / count}


def sample_labels(logits: torch.Tensor, seed: int, iteration: int, index: int) -> torch.Tensor:
    """Labels drawn from softmax(`logits`) [..., V] with a generator seeded by (seed, iteration,
    index of the micro-batch in the global batch): the draw does not depend on the number of
    ranks, on how micro-batches are spread over them, or on the global RNG (so a resumed run
    draws the same labels)."""
    g = torch.Generator(device=logits.device).manual_seed((seed * 1_000_003 + iteration) * 65_537 + index)
    probs = torch.softmax(logits.detach().float(), dim=-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=g).view(logits.shape[:-1])


def sampled_label_gradient(module: torch.nn.Module, params: list, replay: Callable[[], Iterable], seed: int = 0,
                           iteration: int = 0, whole_batch: bool = False) -> list:
    """Gradient of the masked-mean cross-entropy against labels sampled from the model's own
    predictive distribution (`sample_labels`), in fp32, averaged over the micro-batches of the
    global batch: this rank's (`replay()`), then over the ranks that hold the same weights (the
    data-parallel group; with Ulysses SP the sequence+data group). `whole_batch`: `replay()`
    already yields the whole global batch."""
    from megatron.core import parallel_state  # noqa: PLC0415

    batches = list(replay())
    distributed = dist.is_initialized() and dist.get_world_size() > 1 and not whole_batch
    first = parallel_state.get_data_parallel_rank() * len(batches) if distributed else 0
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for m, (tokens, mask) in enumerate(batches):
        with torch.enable_grad():
            logits = module(tokens).float()
            y = sample_labels(logits, seed, iteration, first + m)
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
            loss = (ce * mask).sum() / mask.sum().clamp(min=1.0)
            gs = torch.autograd.grad(loss, params, allow_unused=True)
        for acc, gp in zip(grads, gs):  # averaged in fp32 (dividing the loss first would push fp16 gradients
            if gp is not None:          # towards underflow, and differently for another micro-batch split)
                acc.add_(gp.float(), alpha=1.0 / len(batches))
    if distributed:
        group = parallel_state.get_sequence_data_parallel_group()
        n = dist.get_world_size(group)
        for gp in grads:
            dist.all_reduce(gp, group=group)
            gp.div_(n)
    return grads


def check_sophiag(config: Config) -> list[str]:
    errs = []
    if int(config.parallel.zero_stage) == 3:
        errs.append("--optimizer sophiag refreshes its Hessian estimate from an extra backward through the model's "
                    "whole weights, which ZeRO-3 keeps partitioned: use --zero-stage 1 or 2")
    if int(config.optimizer.sophiag_hessian_interval) < 1:
        errs.append(f"--sophiag-hessian-interval must be >= 1 (got {config.optimizer.sophiag_hessian_interval})")
    return errs


@register_optimizer("sophiag", check=check_sophiag,
                    help="SophiaG with a Gauss-Newton-Bartlett Hessian refresh every --sophiag-hessian-interval steps")
def build_sophiag(groups: list[dict], config: Config) -> torch.optim.Optimizer:
    bs = int(config.training.global_batch_size) * int(config.model.seq_length)
    o = config.optimizer
    return SophiaG(groups, lr=config.schedule.lr, betas=(o.sophiag_beta1, o.sophiag_beta2),
                   rho=o.sophiag_rho, weight_decay=o.weight_decay, bs=bs,
                   hessian_interval=o.sophiag_hessian_interval, seed=config.model.seed)
