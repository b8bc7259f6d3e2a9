"""Muon (MomentUm Orthogonalized by Newton-Schulz) and MuonClip.

Which parameters take Muon: 2-D hidden matrices (attention QKV/dense, MLP); embeddings, the LM
head, norms and biases take the auxiliary AdamW (``--muonadamw-beta1/2``, ``--muonadamw-eps``).

Where it runs: everywhere, the same code. At ZeRO 0 in fp32 it holds the real 2-D weights; under
ZeRO 1/2/3 and DeepSpeed's bf16/fp16 optimizers it holds flat partitions, and the Newton-Schulz
step runs on the whole update matrices gathered from them (megatron/optimizer/partition.py), so
every stage and precision computes the update of the single-rank run. Numerically it is
``torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`` on the Muon half (EMA momentum, Nesterov,
quintic Newton-Schulz in bf16, update scaled by 0.2*sqrt(max(A, B)), decoupled weight decay with
the base LR) and ``torch.optim.AdamW`` on the other half. Gradient clipping (``--clip-grad``)
applies to the gradient before the momentum, as for every optimizer. The momentum stays
partitioned like Adam's moments; the whole-matrix gather is transient.

Earlier versions used DeepSpeed's ZeRO-aware ``MuonWithAuxAdam`` at ZeRO 1/2: it fixed Nesterov
and 5 steps, did not clip, and kept its momentum per whole matrix (universal conversion still
reads such checkpoints).

Upstream (ALCF) Muon under ZeRO saw flat 1-D partitions and silently ran AdamW; its step raised
NameError on the first 2-D weight; it read weight decay from a key the scheduler never writes.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from megatron.config import Config
from megatron.optimizer import get_param_groups, register_optimizer
from megatron.optimizer.base import ElementwiseOptimizer
from megatron.optimizer.partition import PartitionedWeights

log = logging.getLogger(__name__)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
DEEPSPEED_NS_STEPS = 5
# Name fragments of 2-D parameters that are not hidden matrices (vocab-sized): AdamW takes them.
MUON_EXCLUDE = ("word_embeddings", "position_embeddings", "output_layer", "embed", "lm_head")


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Muon for 2-D hidden matrices; embeddings, LM head, norms and biases go to AdamW."""
    return p.ndim == 2 and not any(x in name for x in MUON_EXCLUDE)


def rms_scale(shape: Iterable[int]) -> float:
    """Moonlight's RMS-matching factor 0.2*sqrt(max(A, B)) (torch's "match_rms_adamw")."""
    a, b = list(shape)[:2]
    return 0.2 * math.sqrt(max(a, b))


def keller_scale(shape: Iterable[int]) -> float:
    """Keller Jordan's factor sqrt(max(1, A/B)) (torch's "original", DeepSpeed's)."""
    a, b = list(shape)[:2]
    return math.sqrt(max(1.0, a / b))


def newton_schulz(g: torch.Tensor, steps: int, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalization in `dtype` (bf16: the same operations as
    torch.optim.Muon; fp32 gives results reproducible across implementations, see the tests)."""
    a, b, c = coefficients
    x = g.to(dtype)
    if g.size(0) > g.size(1):
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if g.size(0) > g.size(1):
        x = x.T
    return x


# ----------------------------------------------------------------------------- our Muon
class Muon(PartitionedWeights, ElementwiseOptimizer):
    """Muon on groups with ``muon=True`` (2-D weights), AdamW on the others.

    `adjust_lr`: "match_rms_adamw" (0.2*sqrt(max(A,B)), default, as upstream) or "original"
    (sqrt(max(1, A/B)), Keller). `qk_clip_t`: if set, `after_step` applies MuonClip's QK-clip.
    `ns_dtype`: the Newton-Schulz precision (bf16 as torch and DeepSpeed; fp32 for exact comparisons).
    """
    counters = ("qk_clip.fired",)  # MuonClip's clipped-head count continues on resume

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = DEEPSPEED_NS_STEPS, eps: float = 1e-7,
                 adjust_lr: str = "match_rms_adamw", adamw_betas: tuple[float, float] = (0.9, 0.999),
                 adamw_eps: float = 1e-12, qk_clip_t: float | None = None, qk_clip_alpha: float = 0.5,
                 ns_dtype: torch.dtype = torch.bfloat16) -> None:
        if adjust_lr not in ("match_rms_adamw", "original"):
            raise ValueError(f"adjust_lr must be 'match_rms_adamw' or 'original', got {adjust_lr!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        eps=eps, adjust_lr=adjust_lr, betas=tuple(adamw_betas), adamw_eps=adamw_eps, muon=True)
        super().__init__(params, defaults)
        for g in self.param_groups:
            if g["muon"]:
                bad = [tuple(p.shape) for p in g["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon groups take 2-D weights only, got shapes {bad}")
        self.ns_dtype = ns_dtype
        self.qk_clip_t = qk_clip_t
        self.qk_clip_alpha = qk_clip_alpha
        self.qk_clip = QKClip(qk_clip_t, qk_clip_alpha) if qk_clip_t else None

    def group_buffers(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["muon"] else ("exp_avg", "exp_avg_sq")

    def group_counts_steps(self, group: dict) -> bool:
        return not group["muon"]  # the Muon half keeps only its momentum (as torch.optim.Muon)

    def update(self, p, grad, state, g, t) -> None:
        (self._muon_update if g["muon"] else self._adamw_update)(p, grad, state, g, t)

    def _muon_update(self, p, grad, state, g, t) -> None:
        lr, mu = g["lr"], g["momentum"]
        scale = rms_scale if g["adjust_lr"] == "match_rms_adamw" else keller_scale
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - mu)
        update = grad.lerp(buf, mu) if g["nesterov"] else buf
        layout = self.layout(p)  # whole matrices, also when `p` is a ZeRO partition (partition.py)
        ortho = [newton_schulz(u, g["ns_steps"], g["eps"], dtype=self.ns_dtype).float() * scale(u.shape)
                 for u in layout.gather(update)]
        p.mul_(1 - lr * g["weight_decay"])
        p.add_(layout.scatter(ortho, like=p), alpha=-lr)

    def _adamw_update(self, p, grad, state, g, t) -> None:
        lr, (b1, b2), eps = g["lr"], g["betas"], g["adamw_eps"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        p.mul_(1 - lr * g["weight_decay"])
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))

    def after_step(self, iteration: int, module: torch.nn.Module, replay: Callable[[], Iterable]) -> dict:
        if self.qk_clip is None:
            return {}
        return self.qk_clip(module, replay, self.scale_model_param)


# ----------------------------------------------------------------------------- MuonClip's QK-clip
def _replica_group():
    """The ranks that hold the same heads (data parallel; with Ulysses SP sequence+data): the max
    logit of a head is reduced over them, never across tensor-parallel ranks (other heads)."""
    from megatron.core import parallel_state  # noqa: PLC0415

    try:
        return parallel_state.get_sequence_data_parallel_group()
    except RuntimeError:  # no Megatron groups (a single process): the default group
        return None


def _attention_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if hasattr(m, "query_key_value") and hasattr(m, "n_kv")]


@torch.no_grad()
def max_logits(attn: torch.nn.Module, x: torch.Tensor, rope, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head max of the attention logits q.k*scale of `attn` (our fused QKV layout: per KV
    group, its g query heads then k then v; scale 1/sqrt(d) or MuP's) on input `x` [b, s, h],
    over the causal positions or those `mask` allows (bool [b, 1, s, s]) -> [n_heads]."""
    from megatron.model.gpt import apply_rotary  # noqa: PLC0415

    b, s, _ = x.shape
    g, d = attn.group, attn.d
    qkv = attn.query_key_value(x).view(b, s, attn.n_kv, g + 2, d)
    q = qkv[:, :, :, :g].reshape(b, s, attn.n_heads, d)
    k = qkv[:, :, :, g]
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k = k.repeat_interleave(g, dim=2)  # head i uses kv group i // g
    scale = getattr(attn, "scale", None) or 1 / math.sqrt(d)
    scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) * scale
    allowed = mask if mask is not None else torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))


class QKClip:
    """MuonClip's QK-clip on the fused QKV weight (Kimi K2): each training forward records, per
    head, the largest attention logit it computed; after the optimizer step every head whose max
    over the step's micro-batches (and over the data-parallel ranks) exceeds `t` has its logits
    scaled by eta = t/max: its query rows by eta^alpha and its KV group's key rows by
    eta^(1-alpha) (with grouped query attention the key of a group takes the smallest eta of its
    heads and each query head makes up the rest, so every head's logits scale by exactly its own
    eta). `attach(model)` installs the recording hooks (the loop does it at start-up); the max is
    a per-head vector, so recording costs one extra QK product per layer and no stored activations."""

    def __init__(self, t: float, alpha: float) -> None:
        self.t, self.alpha = float(t), float(alpha)
        self.maxes: dict[torch.nn.Module, torch.Tensor] = {}
        self.handles: list = []
        self.fired = 0  # number of (step, head) clips so far

    @torch.no_grad()
    def _record(self, attn, inputs) -> None:
        if attn.training:
            x, rope, *mask = inputs  # (x, rope[, mask]) as Attention.forward takes them
            m = max_logits(attn, x.detach(), rope, mask[0] if mask else None)
            prev = self.maxes.get(attn)
            self.maxes[attn] = m if prev is None else torch.maximum(prev, m)

    def attach(self, module: torch.nn.Module) -> None:
        if not self.handles:
            for attn in _attention_modules(module):
                self.handles.append(attn.register_forward_pre_hook(lambda m, inp: self._record(m, inp)))

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, replay: Callable[[], Iterable],
                 scale_param: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> dict:
        """`scale_param(w, factor)` multiplies weight `w` by `factor` (the optimizer's, which also
        scales its master copy under ZeRO/bf16); default: in place on the model's weight. Not
        attached during the step: the step's micro-batches (`replay()`) are measured now."""
        if not self.handles:
            self.attach(module)
            was_training = module.training
            module.train()
            for tokens, _mask in replay():
                module(tokens)
            module.train(was_training)
        attns = [a for a in _attention_modules(module) if a in self.maxes]
        clipped, worst = 0, 0.0
        if attns:  # every layer's maxima [layers, heads] in one all-reduce and one host read per step
            maxes = torch.stack([self.maxes.pop(a) for a in attns])
            group = _replica_group()
            if dist.is_initialized() and dist.get_world_size(group) > 1:
                dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            etas = torch.where(maxes > self.t, self.t / maxes, torch.ones_like(maxes)).clamp(max=1.0)
            per_layer = torch.stack([maxes.amax(dim=1), (etas < 1).sum(dim=1).to(maxes.dtype)], dim=1).tolist()
            for attn, eta, (layer_max, n_clipped) in zip(attns, etas, per_layer):
                worst = max(worst, layer_max)
                if n_clipped:
                    clipped += int(n_clipped)
                    self._scale(attn, eta, scale_param or (lambda w, f: w.mul_(f.to(w.dtype))))
        self.fired += clipped
        return {"muonclip_heads_clipped": clipped, "muonclip_max_logit": worst, "muonclip_fired_total": self.fired}

    def _scale(self, attn, eta: torch.Tensor, scale_param) -> None:
        g, d, n_kv = attn.group, attn.d, attn.n_kv
        eta = eta.view(n_kv, g)
        eta_k = eta.min(dim=1).values ** (1 - self.alpha)  # [n_kv]
        eta_q = eta / eta_k[:, None]  # per head: eta_q * eta_k = eta
        rows = torch.ones(n_kv, g + 2, dtype=attn.query_key_value.weight.dtype, device=eta.device)
        rows[:, :g] = eta_q
        rows[:, g] = eta_k
        rows = rows.repeat_interleave(d, dim=1).view(-1)  # [(n_kv*(g+2))*d]
        weight = attn.query_key_value.weight
        scale_param(weight, rows[:, None].to(weight.device))
        if attn.query_key_value.bias is not None:
            scale_param(attn.query_key_value.bias, rows.to(weight.device))


# ----------------------------------------------------------------------------- registry entries
def muon_groups(named, config: Config) -> list[dict]:
    """Muon half (2-D hidden matrices, key ``muon=True``) + AdamW half (decay / no decay).
    (Not ``use_muon``: DeepSpeed's bf16 optimizer reads that key and would run its own Muon.)"""
    named = [(n, p) for n, p in named if p.requires_grad]
    muon = [p for n, p in named if is_muon_param(n, p)]
    other = [(n, p) for n, p in named if not is_muon_param(n, p)]
    groups: list[dict] = []
    if muon:
        groups.append({"params": muon, "name": "muon", "muon": True, "lr_mult": 1.0, "wd_mult": 1.0})
    for g in get_param_groups(other):
        g["name"] = "adamw_" + g["name"]
        g["muon"] = False
        groups.append(g)
    return groups


def _muon_kwargs(config: Config) -> dict:
    o = config.optimizer
    return dict(lr=config.schedule.lr, weight_decay=o.weight_decay, momentum=o.muon_momentum,
                nesterov=o.muon_nesterov, ns_steps=o.muon_ns_steps,
                adamw_betas=(o.muonadamw_beta1, o.muonadamw_beta2),
                adamw_eps=o.muonadamw_eps,
                # Newton-Schulz in the training precision: bf16 matmuls (as torch.optim.Muon) for bf16/fp16
                # runs; fp32 for fp32 runs, whose update then does not depend on how ZeRO partitions it
                ns_dtype=torch.bfloat16 if config.precision.bf16 or config.precision.fp16 else torch.float32)


def check_muon(config: Config) -> list[str]:
    if config.optimizer.optimizer == "muonclip" and int(config.parallel.zero_stage) == 3:
        return ["--optimizer muonclip rescales rows of the model's whole QKV weights after the step, which ZeRO-3 "
                "keeps partitioned: use --zero-stage 1 or 2 (or --optimizer muon at ZeRO-3)"]
    return []


@register_optimizer("muon", check=check_muon, groups=muon_groups,
                    help="Muon on 2-D hidden matrices (0.2*sqrt(max(A,B)) scale), AdamW on the rest; every ZeRO "
                         "stage and precision (Newton-Schulz on whole gathered matrices)")
def build_muon(groups: list[dict], config: Config):
    return Muon(groups, **_muon_kwargs(config))


@register_optimizer("muonclip", check=check_muon, groups=muon_groups,
                    help="Muon with QK-clip: heads whose max attention logit exceeds --muonclip-t get W_q, W_k "
                         "rescaled (ZeRO 0/1/2)")
def build_muonclip(groups: list[dict], config: Config):
    return Muon(groups, **_muon_kwargs(config), adjust_lr="original",
                qk_clip_t=config.optimizer.muonclip_t, qk_clip_alpha=config.optimizer.muonclip_alpha)
