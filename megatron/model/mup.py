"""MuP (width) and CompleteP (depth) parametrizations: model multipliers and per-group optimizer scaling.

With width multiplier ``m_N = hidden / --mup-base-width`` and depth multiplier
``m_L = num_layers / --depth-base`` (each 1 when its feature is off) and ``a = --depth-alpha``:

model (``GPTConfig`` fields, see ``model_fields``)
    * embedding output x ``--mup-input-alpha``;
    * final hidden state (= logits) x ``--mup-output-alpha / m_N``;
    * attention scores x ``--mup-attn-alpha / d_head`` instead of ``1 / sqrt(d_head)``;
    * hidden matrices (QKV, attention out, MLP in/out) initialized with std ``sigma / sqrt(m_N)``;
      the output projections keep Megatron's extra ``1 / sqrt(2 L)``, with ``L = --depth-base``
      under depth scaling so the init does not change with depth;
    * every residual branch (attention, MLP) x ``m_L ** -a``.

optimizer (per parameter group, see ``multipliers``; the scheduler applies ``lr_mult`` and
``wd_mult`` every step, ``eps`` is set once)

    ==============  ======================  ==========  ======================
    role            lr_mult                 wd_mult     Adam eps multiplier
    ==============  ======================  ==========  ======================
    embedding       1                       1           1 / m_N
    output layer    1                       1           1 / m_N
    hidden matrix   m_L^(a-1) / m_N         m_N         m_L^-a / m_N
    layer vectors   m_L^(a-1)               (no WD)     m_L^-a / m_N
    final norm      1                       (no WD)     1 / m_N
    ==============  ======================  ==========  ======================

Hidden matrices that Muon updates (groups with ``muon``) get ``m_L^(a-1) / m_N^k`` instead,
with ``k = MUON_WIDTH_EXPONENT`` of the optimizer: Muon's orthogonalized update has a fixed
spectral norm, so only the RMS-matching rescale ``0.2 sqrt(max(A, B))`` needs ``1/sqrt(m_N)``.

``ALCF/notes/mup.md`` explains the recipe. The formulas follow Yang et al. (muP, Tensor
Programs V) and Dey et al. (CompleteP, arXiv 2505.01618).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from megatron.config import ModelConfig, OptimizerConfig

__all__ = [
    "Parametrization",
    "Multipliers",
    "ROLES",
    "param_role",
    "model_fields",
    "parametrize_param_groups",
    "MUON_WIDTH_EXPONENT",
]

ROLES = ("embedding", "output", "hidden", "layer_vector", "final_vector")

# Width exponent k of the hidden-matrix LR (lr x m_N^-k) for optimizers whose update of a 2-D
# weight is orthogonalized: "muon" rescales to Adam's RMS (0.2 sqrt(max(A, B))), so its spectral
# norm grows like sqrt(width); "muonclip" uses Keller's sqrt(max(1, A/B)), already width-free.
MUON_WIDTH_EXPONENT = {"muon": 0.5, "muonclip": 0.0}
_DEFAULT_MUON_WIDTH_EXPONENT = 0.5


@dataclass(frozen=True)
class Multipliers:
    lr: float = 1.0
    wd: float = 1.0
    eps: float = 1.0


@dataclass(frozen=True)
class Parametrization:
    """Width (MuP) and depth (CompleteP) settings; all multipliers are 1 when both are off."""

    mup: bool = False
    width_mult: float = 1.0  # m_N = hidden / base width
    input_alpha: float = 1.0
    output_alpha: float = 1.0
    attn_alpha: float = 1.0
    depth: bool = False
    depth_mult: float = 1.0  # m_L = layers / base layers
    depth_alpha: float = 1.0
    depth_base: float | None = None  # base number of layers (for the output-projection init)

    def __post_init__(self) -> None:
        for name in ("width_mult", "depth_mult"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"Parametrization: {name} must be a positive number, got {v}")

    @property
    def enabled(self) -> bool:
        return self.mup or self.depth

    @property
    def m_n(self) -> float:
        return self.width_mult if self.mup else 1.0

    @property
    def m_l(self) -> float:
        return self.depth_mult if self.depth else 1.0

    @property
    def residual_multiplier(self) -> float:
        return self.m_l ** -self.depth_alpha if self.depth else 1.0

    @property
    def output_multiplier(self) -> float:
        return self.output_alpha / self.m_n if self.mup else 1.0

    @property
    def input_multiplier(self) -> float:
        return self.input_alpha if self.mup else 1.0

    def attention_scale(self, kv_channels: int) -> float | None:
        """Softmax scale; None keeps the standard 1/sqrt(d_head)."""
        return self.attn_alpha / kv_channels if self.mup else None

    def multipliers(self, role: str, muon: bool = False, optimizer: str = "") -> Multipliers:
        """LR, WD and Adam-eps multipliers of a parameter of `role` (see the module table)."""
        if role not in ROLES:
            raise ValueError(f"unknown parameter role {role!r}; one of {ROLES}")
        m_n, m_l, a = self.m_n, self.m_l, self.depth_alpha
        depth_lr = m_l ** (a - 1.0) if self.depth else 1.0
        depth_eps = m_l ** -a if self.depth else 1.0
        if role == "hidden":
            if muon:
                k = MUON_WIDTH_EXPONENT.get(optimizer, _DEFAULT_MUON_WIDTH_EXPONENT)
                return Multipliers(lr=depth_lr * m_n ** -k, wd=m_n ** k, eps=1.0)
            return Multipliers(lr=depth_lr / m_n, wd=m_n, eps=depth_eps / m_n)
        if role == "layer_vector":
            return Multipliers(lr=depth_lr, wd=1.0, eps=depth_eps / m_n)
        return Multipliers(lr=1.0, wd=1.0, eps=1.0 / m_n)  # embedding, output, final_vector

    def model_fields(self, num_layers: int, kv_channels: int) -> dict:
        """GPTConfig keyword arguments carrying this parametrization (neutral values when off)."""
        return {
            "embedding_multiplier": self.input_multiplier,
            "output_multiplier": self.output_multiplier,
            "attention_scale": self.attention_scale(kv_channels),
            "residual_multiplier": self.residual_multiplier,
            "init_width_multiplier": self.m_n,
            "residual_init_layers": (self.depth_base if self.depth and self.depth_base else None),
        }

    @classmethod
    def from_config(cls, model: ModelConfig) -> "Parametrization":
        """From a validated model section (`ModelConfig.mup_problems()` returned nothing)."""
        mup = bool(model.enable_mup)
        depth = bool(model.enable_depth_scale)
        width_mult, depth_mult, depth_base = 1.0, 1.0, None
        if mup:
            base = model.mup_base_width
            width_mult = model.hidden_size / base if base else float(model.mup_width_multiplier)
        if depth:
            depth_base = model.depth_base
            depth_mult = model.num_layers / depth_base if depth_base else float(model.depth_multiplier)
            if not depth_base:
                depth_base = model.num_layers / depth_mult
        return cls(mup=mup, width_mult=width_mult, input_alpha=model.mup_input_alpha,
                   output_alpha=model.mup_output_alpha, attn_alpha=model.mup_attn_alpha,
                   depth=depth, depth_mult=depth_mult, depth_alpha=model.depth_alpha,
                   depth_base=depth_base)


def param_role(name: str, ndim: int) -> str:
    """Role of a parameter of GPTModel from its (upstream) name."""
    if name.endswith(("word_embeddings.weight", "position_embeddings.weight")):
        return "embedding"
    if name.endswith("output_layer.weight"):
        return "output"
    if ".layers." in name:
        return "hidden" if ndim >= 2 and not name.endswith(".bias") else "layer_vector"
    return "final_vector"


def model_fields(model: ModelConfig) -> dict:
    """GPTConfig keyword arguments for the parametrization the model section selects."""
    kv = model.kv_channels or model.hidden_size // model.num_attention_heads
    return Parametrization.from_config(model).model_fields(model.num_layers, kv)


def parametrize_param_groups(groups: list[dict], named_params: Iterable[tuple[str, Any]], model: ModelConfig,
                             optimizer: OptimizerConfig) -> list[dict]:
    """Split each optimizer group by parameter role and multiply in the MuP/CompleteP factors.

    A group keeps its keys (``muon``, its own ``lr_mult``/``wd_mult``...); the role's LR and WD
    multipliers are multiplied into ``lr_mult``/``wd_mult``, its name gets ``.<role>`` appended,
    ``mup_role`` records the role, and ``eps`` is set to ``--adam-eps`` x the eps multiplier (an
    optimizer without eps ignores the key). Returns `groups` unchanged when both features are off.
    """
    par = Parametrization.from_config(model)
    if not par.enabled:
        return groups
    names = {id(p): n for n, p in named_params}
    base_eps = float(optimizer.adam_eps)
    name = optimizer.optimizer
    out: list[dict] = []
    for g in groups:
        by_role: dict[str, list] = {}
        for p in g["params"]:
            by_role.setdefault(param_role(names[id(p)], p.ndim), []).append(p)
        for role in ROLES:
            if role not in by_role:
                continue
            m = par.multipliers(role, muon=bool(g.get("muon", False)), optimizer=name)
            ng = {**g, "params": by_role[role], "name": f"{g.get('name', 'group')}.{role}", "mup_role": role,
                  "lr_mult": g.get("lr_mult", 1.0) * m.lr, "wd_mult": g.get("wd_mult", 1.0) * m.wd}
            if not g.get("muon", False):
                ng["eps"] = g.get("eps", base_eps) * m.eps
            out.append(ng)
    return out
