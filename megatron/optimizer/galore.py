"""GaLore (Zhao et al. 2024): AdamW on low-rank projections of the 2-D gradients.

``galoreadamw`` is galore-torch's ``GaLoreAdamW`` step (its README settings: rank 128, projection
refreshed every 200 steps from an SVD of the gradient, scale 0.25, "std" projection side; bias-
corrected moments; weight decay applied after the update), written on whole matrices so it runs
at every ZeRO stage and precision: under ZeRO / DeepSpeed's bf16 optimizer the 2-D gradients are
gathered from the partitions (megatron/optimizer/partition.py), the low-rank step runs on the whole
matrix on every rank (its state — the projection and the low-rank moments — is per matrix and
small, so it is kept whole, not partitioned), and each rank applies its fragment of the update.
`tests/test_optimizer_galore.py` holds it to galore-torch's own class; the optimizer matrix holds
the partitioned runs to the single-process one.

``galoreadamw8bit`` is galore-torch's 8-bit class itself (bitsandbytes' blockwise-quantized states):
a CUDA GPU (bitsandbytes has no CPU/XPU 8-bit optimizer kernels), ZeRO 0 in fp32 only, since its
quantization blocks would straddle tensors in a flat partition.
``galoreadamw8bitperlayer`` is refused (it steps inside backward hooks, which DeepSpeed does not allow).
"""
from __future__ import annotations

import math

import torch

from megatron.config import Config
from megatron.optimizer import needs_module, register_optimizer
from megatron.optimizer.basic import adam_kwargs
from megatron.optimizer.partition import PartitionedWeights

SETTINGS = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}


def galore_groups(groups: list[dict]) -> list[dict]:
    """2-D weights take the low-rank step (GaLore's README settings), the rest plain AdamW."""
    out = []
    for g in groups:
        mats = [p for p in g["params"] if p.ndim == 2]
        rest = [p for p in g["params"] if p.ndim != 2]
        if mats:
            out.append({**g, "params": mats, **SETTINGS})
        if rest:
            out.append({**g, "params": rest})
    return out


def _projection(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """GaLore's "std" projection matrix: the top-`rank` right singular vectors (rows) of a tall or
    square gradient, the left ones (columns) of a wide one."""
    u, _s, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return vh[:rank, :] if grad.shape[0] >= grad.shape[1] else u[:, :rank]


def _project(grad: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return grad @ p.t() if grad.shape[0] >= grad.shape[1] else p.t() @ grad


def _project_back(low: torch.Tensor, p: torch.Tensor, scale: float) -> torch.Tensor:
    return (low @ p if low.shape[0] >= low.shape[1] else p @ low) * scale


class GaLoreAdamW(PartitionedWeights, torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @staticmethod
    def _moments(state: dict, key: str, grad: torch.Tensor, g: dict) -> torch.Tensor:
        """AdamW direction m/(sqrt(v)+eps) of `grad`, moments kept under `key`."""
        b1, b2 = g["betas"]
        if "exp_avg" + key not in state:
            state["exp_avg" + key] = torch.zeros_like(grad)
            state["exp_avg_sq" + key] = torch.zeros_like(grad)
        m, v = state["exp_avg" + key], state["exp_avg_sq" + key]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        return m / v.sqrt().add_(g["eps"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                t = int(state.get("step", torch.zeros(())).item())
                size = g["lr"] * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
                if "rank" not in g:  # element-wise AdamW, partitioned or not
                    update = self._moments(state, "", p.grad, g)
                else:  # whole matrices, gathered from this rank's fragments
                    layout = self.layout(p)
                    updates = []
                    for i, grad in enumerate(layout.gather(p.grad)):
                        if t % g["update_proj_gap"] == 0 or f"projection{i}" not in state:
                            state[f"projection{i}"] = _projection(grad, g["rank"])
                        proj = state[f"projection{i}"]
                        low = self._moments(state, str(i), _project(grad, proj), g)
                        updates.append(_project_back(low, proj, g["scale"]))
                    update = layout.scatter(updates, like=p)
                state["step"] = torch.tensor(float(t + 1))
                p.add_(update, alpha=-size)
                if g["weight_decay"] > 0:
                    p.add_(p, alpha=-g["lr"] * g["weight_decay"])
        return loss


_need_galore = needs_module("galore_torch", "pip install galore-torch", "GaLore")


def check_galore(config: Config) -> list[str]:
    errs, name = _need_galore(config), config.optimizer.optimizer
    if name == "galoreadamw8bit":
        from megatron.optimizer.fallbacks import eight_bit_problems  # noqa: PLC0415
        errs += eight_bit_problems(config)
    if name == "galoreadamw8bitperlayer":
        errs.append("--optimizer galoreadamw8bitperlayer steps each layer inside backward hooks, which DeepSpeed's "
                    "engine does not support: use --optimizer galoreadamw (or galoreadamw8bit)")
    elif name == "galoreadamw8bit" and (int(config.parallel.zero_stage) >= 1 or config.precision.bf16
                                        or config.precision.fp16):
        errs.append("--optimizer galoreadamw8bit quantizes its states in blocks of each tensor, which ZeRO's (and "
                    "the bf16/fp16 optimizer's) flat partitions would mix: use --zero-stage 0 in fp32, or "
                    "--optimizer galoreadamw")
    return errs


@register_optimizer("galoreadamw", check=check_galore,
                    help="GaLore AdamW (rank 128, SVD projection every 200 steps, scale 0.25) on 2-D weights, AdamW "
                         "on the rest; every ZeRO stage and precision")
def build_galore(groups: list[dict], config: Config):
    kw = adam_kwargs(config)
    return GaLoreAdamW(galore_groups(groups), lr=kw["lr"], betas=kw["betas"], eps=kw["eps"],
                       weight_decay=kw["weight_decay"])


@register_optimizer("galoreadamw8bit", check=check_galore, state_copies=0.5,
                    help="galore-torch GaLoreAdamW8bit (bitsandbytes 8-bit states: CUDA; ZeRO 0, fp32)")
def build_galore8(groups: list[dict], config: Config):
    from galore_torch import GaLoreAdamW8bit  # noqa: PLC0415
    return GaLoreAdamW8bit(galore_groups(groups), **adam_kwargs(config))


@register_optimizer("galoreadamw8bitperlayer", check=check_galore, help="refused: per-layer GaLore needs "
                    "backward-hook stepping, not possible under DeepSpeed")
def build_galore8_per_layer(groups: list[dict], config: Config):
    raise RuntimeError("galoreadamw8bitperlayer is refused by validate_args")
