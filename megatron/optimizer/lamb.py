"""LAMB (You et al. 2019): Adam direction rescaled per parameter tensor by ||w|| / ||update||.

The production variant (``lamb``, and the fallback of ``ipex.lamb`` / ``ipex.fusedlamb``):
bias-corrected moments, update u = m_hat/(sqrt(v_hat)+eps) + wd*w, trust ratio
||w||/||u|| (1 when either norm is 0) on every tensor, p <- p - lr*ratio*u; no internal
gradient clipping (DeepSpeed's ``--clip-grad`` already applies). ``ds.fusedlamb`` falls back to
the same with the ratio clamped to [0.01, 10] as DeepSpeed's FusedLamb does.
Under ZeRO (and DeepSpeed's bf16/fp16 optimizers) the norms are of the whole tensors, reduced over
the partition group (megatron/optimizer/partition.py), so every stage computes the same update.
Options `bias_correction=False, weight_norm_clamp=10` give torch-optimizer's `Lamb` (the
variant our parity test pins).
"""
from __future__ import annotations

import torch

from megatron.config import Config
from megatron.optimizer import have_module, register_optimizer, warn_once
from megatron.optimizer.base import ElementwiseOptimizer
from megatron.optimizer.basic import adam_kwargs
from megatron.optimizer.partition import PartitionedWeights


class LAMB(PartitionedWeights, ElementwiseOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, bias_correction: bool = True, weight_norm_clamp: float | None = None,
                 ratio_clamp: tuple[float, float] | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, weight_norm_clamp=weight_norm_clamp,
                                      ratio_clamp=ratio_clamp))

    buffers = ("exp_avg", "exp_avg_sq")

    def update(self, p, grad, state, g, t) -> None:
        b1, b2 = g["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        if g["bias_correction"]:
            update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt().add_(g["eps"]))
        else:
            update = m / v.sqrt().add(g["eps"])
        if g["weight_decay"]:
            update.add_(p, alpha=g["weight_decay"])
        # per whole tensor, also when `p` is a ZeRO partition holding pieces of many (partition.py)
        layout = self.layout(p)
        w_norm, u_norm = layout.sq_norms(p).sqrt(), layout.sq_norms(update).sqrt()
        if g["weight_norm_clamp"] is not None:
            w_norm = w_norm.clamp(0, g["weight_norm_clamp"])
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        if g["ratio_clamp"] is not None:
            ratio = ratio.clamp(*g["ratio_clamp"])
        p.sub_(update * layout.per_element(g["lr"] * ratio, like=p))


def _lamb(groups, config: Config, **kw) -> LAMB:
    return LAMB(groups, **adam_kwargs(config), **kw)


def _ipex_works() -> bool:
    """IPEX imports only with the torch it was built for (not torch 2.13 on CPU): try it."""
    if not have_module("intel_extension_for_pytorch"):
        return False
    try:
        import intel_extension_for_pytorch  # noqa: F401, PLC0415
        return True
    except Exception:  # noqa: BLE001 - a broken IPEX raises all sorts (AttributeError, ImportError)
        return False


@register_optimizer("lamb", help="LAMB (bias-corrected, trust ratio ||w||/||u|| on every tensor)")
def build_lamb(groups: list[dict], config: Config) -> torch.optim.Optimizer:
    return _lamb(groups, config)


def _ipex_lamb(groups, config: Config, fused: bool):
    if _ipex_works():
        from intel_extension_for_pytorch.optim._lamb import Lamb  # noqa: PLC0415
        return Lamb(groups, **adam_kwargs(config), fused=fused)
    name = config.optimizer.optimizer
    warn_once(name, f"--optimizer {name}: intel_extension_for_pytorch is not usable here; running the same LAMB "
              "math from megatron/optimizer/lamb.py")
    return _lamb(groups, config)


@register_optimizer("ipex.lamb", help="IPEX LAMB; falls back to lamb (same math) without a working IPEX")
def build_ipex_lamb(groups: list[dict], config: Config):
    return _ipex_lamb(groups, config, fused=False)


@register_optimizer("ipex.fusedlamb", help="IPEX fused LAMB; falls back to lamb (same math) without a working IPEX")
def build_ipex_fusedlamb(groups: list[dict], config: Config):
    return _ipex_lamb(groups, config, fused=True)


@register_optimizer("ds.fusedlamb", help="DeepSpeed FusedLamb (CUDA); on CPU lamb with its [0.01, 10] ratio clamp")
def build_ds_fusedlamb(groups: list[dict], config: Config):
    if torch.cuda.is_available():
        from deepspeed.ops.lamb import FusedLamb  # noqa: PLC0415
        return FusedLamb(groups, **adam_kwargs(config))
    warn_once("ds.fusedlamb", "--optimizer ds.fusedlamb: DeepSpeed's FusedLamb needs CUDA; running the same LAMB "
              "math (trust ratio clamped to [0.01, 10]) from megatron/optimizer/lamb.py")
    return _lamb(groups, config, ratio_clamp=(0.01, 10.0))
