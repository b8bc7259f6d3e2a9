"""Names that need hardware or packages this machine may not have.

Either they fall back to a mathematically equivalent optimizer with ONE warning (apex.adam ->
adamw, since apex's FusedAdam defaults to AdamW mode; apex.sgd -> sgd), or `check` refuses them
at start-up with the package to install (never a TypeError mid-run, as upstream).
"""
from __future__ import annotations

import torch

from megatron.config import Config
from megatron.optimizer import (
    DeepSpeedOptimizer,
    have_module,
    needs_module,
    register_optimizer,
    warn_once,
)
from megatron.optimizer.basic import adam_kwargs, build_adamw, build_sgd


def _apex_cuda() -> bool:
    return torch.cuda.is_available() and have_module("apex")


@register_optimizer("apex.adam", help="apex FusedAdam (CUDA); else torch AdamW (same math)")
def build_apex_adam(groups: list[dict], config: Config):
    if _apex_cuda():
        from apex.optimizers import FusedAdam  # noqa: PLC0415
        return FusedAdam(groups, **adam_kwargs(config))
    warn_once("apex.adam", "--optimizer apex.adam: apex/CUDA not available; running torch.optim.AdamW (same math)")
    return build_adamw(groups, config)


@register_optimizer("apex.sgd", state_copies=1.0, help="apex FusedSGD (CUDA); else torch SGD (same math)")
def build_apex_sgd(groups: list[dict], config: Config):
    if _apex_cuda():
        from apex.optimizers import FusedSGD  # noqa: PLC0415
        return FusedSGD(groups, lr=config.schedule.lr, momentum=config.optimizer.sgd_momentum,
                        weight_decay=config.optimizer.weight_decay)
    warn_once("apex.sgd", "--optimizer apex.sgd: apex/CUDA not available; running torch.optim.SGD (same math)")
    return build_sgd(groups, config)


def eight_bit_problems(config: Config) -> list[str]:
    """bitsandbytes' 8-bit optimizers: a CUDA GPU, and the model's own tensors (fp32 at ZeRO 0)."""
    errs = []
    if not torch.cuda.is_available():
        errs.append(f"--optimizer {config.optimizer.optimizer} needs a CUDA GPU (bitsandbytes' 8-bit optimizer kernels "
                    "have no CPU or XPU implementation): use --optimizer adamw here")
    return errs


def _zero_or_half(config: Config) -> bool:
    """ZeRO's or the bf16/fp16 optimizer's flat partitions: no whole tensors for per-tensor state."""
    return int(config.parallel.zero_stage) >= 1 or config.precision.bf16 or config.precision.fp16


def _adam8bit_check(config: Config) -> list[str]:
    errs = needs_module("bitsandbytes", "pip install bitsandbytes", "bitsandbytes")(config)
    errs += eight_bit_problems(config)
    if _zero_or_half(config):
        errs.append("--optimizer adam8bit quantizes its states in blocks of each tensor, which ZeRO's (and the "
                    "bf16/fp16 optimizer's) flat partitions would mix: use --zero-stage 0 in fp32, or --optimizer adamw")
    return errs


@register_optimizer("adam8bit", check=_adam8bit_check, state_copies=0.5,
                    help="bitsandbytes Adam8bit (8-bit optimizer states; ZeRO 0, fp32)")
def build_adam8bit(groups: list[dict], config: Config):
    import bitsandbytes as bnb  # noqa: PLC0415
    return bnb.optim.Adam8bit(groups, **adam_kwargs(config))


def _shampoo_check(config: Config) -> list[str]:
    errs = needs_module("distributed_shampoo", "pip install git+https://github.com/facebookresearch/optimizers.git",
                        "Distributed Shampoo (facebookresearch/optimizers)")(config)
    if _zero_or_half(config):
        errs.append("--optimizer dshampooadamw builds Kronecker-factor preconditioners from whole 2-D gradients, "
                    "which ZeRO's (and the bf16/fp16 optimizer's) flat partitions do not have: use --zero-stage 0 in "
                    "fp32, or --optimizer muon / galoreadamw (whole-matrix optimizers that run under ZeRO)")
    return errs


@register_optimizer("dshampooadamw", check=_shampoo_check, state_copies=3.0,
                    help="Distributed Shampoo with Adam grafting (facebookresearch/optimizers)")
def build_dshampoo(groups: list[dict], config: Config):
    from distributed_shampoo import AdamGraftingConfig, DistributedShampoo  # noqa: PLC0415
    warn_once("dshampoo", "dshampooadamw: Distributed Shampoo's state_dict() is not implemented upstream, so "
              "checkpoint saves with optimizer state may fail (use --no-save-optim)")
    o = config.optimizer
    return DistributedShampoo(
        groups, lr=config.schedule.lr, betas=(o.adam_beta1, o.adam_beta2), epsilon=o.dshampooadamw_eps,
        weight_decay=o.weight_decay,
        max_preconditioner_dim=o.dshampooadamw_max_preconditioner_dim,
        precondition_frequency=o.dshampooadamw_precondition_freq,
        use_decoupled_weight_decay=o.dshampooadamw_use_decoupled_weight_decay,
        grafting_config=AdamGraftingConfig(beta2=o.adam_beta2, epsilon=o.adam_eps))


def _onebit_check(config: Config) -> list[str]:
    if torch.cuda.is_available():
        return []
    return ["--optimizer ds.onebitlamb needs CUDA GPUs (DeepSpeed's OnebitLamb compresses its communication with "
            "NCCL/cupy); on this machine use --optimizer lamb (or ipex.fusedlamb)"]


@register_optimizer("ds.onebitlamb", check=_onebit_check, help="DeepSpeed OnebitLamb (CUDA only)")
def build_onebitlamb(groups: list[dict], config: Config):
    o = config.optimizer
    return DeepSpeedOptimizer(config={"type": "OneBitLamb", "params": {
        "lr": config.schedule.lr, "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps,
        "weight_decay": o.weight_decay}}, param_groups=groups)
