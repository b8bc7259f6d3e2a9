"""LR styles: the `ScheduleSpec` every style reads, and the registry of styles.

A style is one `register_schedule` entry: its formula (`fn(spec, step) -> lr` after the warmup),
its own validation, whether it needs a decay span, and a one-line description (shown by
``--help``). `lr_at` applies the linear warmup, then the style. Adding a style touches this file
only (and its test); the builder (megatron/schedules/build.py) fills the spec's fields from the
flags, whichever style uses them.

Every "steps" quantity of a spec is counted in its unit: ``"samples"`` (the default; an iteration
advances the counter by the global batch size) or ``"tokens"`` (``--lr-decay-tokens``).
The math follows upstream ALCF Megatron-DeepSpeed (ALCF/notes/schedulers.md has the formulas and
the upstream bugs fixed here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

UNITS = ("samples", "tokens")

# Shapes of a decay from 1 to 0 over progress r in [0, 1] (used by linear, cosine, wsd).
DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda r: 1.0 - r,
    "cosine": lambda r: 0.5 * (1.0 + math.cos(math.pi * r)),
    "1-sqrt": lambda r: 1.0 - math.sqrt(r),
}


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything that determines the LR curve. All ``*_steps`` are in ``unit``."""

    max_lr: float
    min_lr: float
    warmup_steps: int  # W
    decay_steps: int  # D, the decay span
    end_steps: int  # E (= D when built from args); constant+cooldown and infinite styles end here
    decay_style: str
    constant_lr: float = 0.00011  # c, plateau of the infinite styles
    constant_steps: int = 0  # Kc, plateau length (infinite styles)
    cooldown_steps: int = 0  # Cd, max -> c phase (infinite styles)
    constant_plus_cooldown_steps: int = 0  # Cc, final 1-sqrt cooldown of "constant" (0 = off)
    timescale: float = 10.0  # tau of infinite-inv-square-root
    wsd_decay_steps: int = 0  # length of the final decay of "wsd"
    wsd_decay_style: str = "1-sqrt"  # linear | cosine | 1-sqrt
    unit: str = "samples"  # samples | tokens

    def __post_init__(self) -> None:
        validate_spec(self)


class ScheduleError(ValueError):
    """An LR schedule that cannot be built; the message names the flag to change."""

    def __init__(self, msg: str):
        super().__init__(f"LR schedule: {msg}")


LRFn = Callable[[ScheduleSpec, int], float]


@dataclass(frozen=True)
class ScheduleStyle:
    """One LR style: `lr(spec, step)` after the warmup, `validate(spec)` (raise ScheduleError),
    `needs_span(spec)`: whether a decay span of 0 is an error."""
    name: str
    lr: LRFn
    description: str = ""
    validate: Callable[[ScheduleSpec], None] = lambda spec: None
    needs_span: Callable[[ScheduleSpec], bool] = lambda spec: True


LR_SCHEDULES: dict[str, ScheduleStyle] = {}


def register_schedule(name: str, description: str = "", validate: Callable[[ScheduleSpec], None] | None = None,
                      needs_span: Callable[[ScheduleSpec], bool] | None = None) -> Callable[[LRFn], LRFn]:
    """Decorator: ``@register_schedule("my-style", "what it does") def f(spec, step) -> lr``."""

    def deco(fn: LRFn) -> LRFn:
        if name in LR_SCHEDULES:
            raise ValueError(f"LR schedule {name!r} is already registered")
        LR_SCHEDULES[name] = ScheduleStyle(name, fn, description or (fn.__doc__ or "").strip().split("\n")[0],
                                           validate or (lambda spec: None), needs_span or (lambda spec: True))
        return fn

    return deco


def validate_spec(s: ScheduleSpec) -> None:
    """The checks every style shares, then the style's own."""
    if s.decay_style not in LR_SCHEDULES:
        raise ScheduleError(f"unknown --lr-decay-style {s.decay_style!r}; choose one of {', '.join(LR_SCHEDULES)}")
    style = LR_SCHEDULES[s.decay_style]
    if s.unit not in UNITS:
        raise ScheduleError(f"unit must be one of {UNITS}, got {s.unit!r}")
    if s.max_lr is None or not s.max_lr >= 0.0:
        raise ScheduleError(f"--lr must be given and >= 0 (got {s.max_lr})")
    if not 0.0 <= s.min_lr <= s.max_lr:
        raise ScheduleError(f"need 0 <= --min-lr <= --lr (got --min-lr {s.min_lr}, --lr {s.max_lr})")
    for name in ("warmup_steps", "decay_steps", "end_steps", "constant_steps", "cooldown_steps",
                 "constant_plus_cooldown_steps", "wsd_decay_steps"):
        if getattr(s, name) < 0:
            raise ScheduleError(f"{name} must be >= 0 (got {getattr(s, name)})")
    if s.warmup_steps > s.decay_steps:
        raise ScheduleError(f"the warmup ({s.warmup_steps} {s.unit}) is longer than the decay span "
                            f"({s.decay_steps} {s.unit}); shorten --lr-warmup-* or lengthen --lr-decay-*/--train-*")
    if s.decay_steps == 0 and style.needs_span(s):
        raise ScheduleError(f"the decay span is 0 {s.unit}; set --train-iters/--lr-decay-iters (or samples/tokens)")
    style.validate(s)


def lr_at(spec: ScheduleSpec, step: int) -> float:
    """LR after ``step`` units have been consumed: linear warmup, then the style's function."""
    W = spec.warmup_steps
    if W > 0 and step <= W:
        return spec.max_lr * float(step) / float(W)
    return LR_SCHEDULES[spec.decay_style].lr(spec, step)


def _decay(spec: ScheduleSpec, shape: str, r: float) -> float:
    return spec.min_lr + DECAY_SHAPES[shape](r) * (spec.max_lr - spec.min_lr)


# ----------------------------------------------------------------------------- constant (+ cooldown)
def _validate_constant(s: ScheduleSpec) -> None:
    Cc, W, span = s.constant_plus_cooldown_steps, s.warmup_steps, min(s.decay_steps, s.end_steps)
    if Cc > 0 and Cc > span - W:
        raise ScheduleError(f"the constant+cooldown cooldown ({Cc} {s.unit}) is longer than the span after warmup "
                            f"({span - W} {s.unit} = decay span {span} - warmup {W}); "
                            "lower --lr_constant_plus_cooldown_frac / --lr-cooldown-iters or the warmup")


@register_schedule("constant", "max LR; with --lr_constant_plus_cooldown a final (1-sqrt) cooldown to --min-lr",
                   validate=_validate_constant, needs_span=lambda s: s.constant_plus_cooldown_steps > 0)
def _constant(spec: ScheduleSpec, step: int) -> float:
    Cc = spec.constant_plus_cooldown_steps
    if Cc <= 0:
        return spec.max_lr
    # Constant, then a (1 - sqrt) cooldown over the last Cc units before E.
    n = step - spec.warmup_steps
    T = spec.end_steps - spec.warmup_steps
    if n >= T:
        return spec.min_lr
    if n < T - Cc:
        return spec.max_lr
    r = min(max((n - (T - Cc)) / Cc, 0.0), 1.0)
    return _decay(spec, "1-sqrt", r)


def _over_span(shape: str) -> LRFn:
    """--lr -> --min-lr with `shape` from the end of the warmup to the end of the decay span."""
    def lr(spec: ScheduleSpec, step: int) -> float:
        if step > spec.decay_steps:
            return spec.min_lr
        W = spec.warmup_steps
        return _decay(spec, shape, (step - W) / (spec.decay_steps - W))
    return lr


_linear = register_schedule("linear", "linear decay from --lr to --min-lr over the decay span")(_over_span("linear"))
_cosine = register_schedule("cosine", "cosine decay from --lr to --min-lr over the decay span")(_over_span("cosine"))


@register_schedule("inverse-square-root", "--lr * sqrt(warmup / step), floored at --min-lr")
def _inverse_square_root(spec: ScheduleSpec, step: int) -> float:
    if step > spec.decay_steps:
        return spec.min_lr
    lr = spec.max_lr * math.sqrt(max(spec.warmup_steps, 1)) / math.sqrt(max(step, 1))
    return max(spec.min_lr, lr)


def _validate_infinite(s: ScheduleSpec) -> None:
    if not s.min_lr > 0.0:
        raise ScheduleError(f"--min-lr must be > 0 for infinite-* schedules (got {s.min_lr}); their final "
                            "phase anneals exponentially towards it")
    if not s.min_lr < s.constant_lr <= s.max_lr:
        raise ScheduleError(f"infinite-* schedules need --min-lr < --constant-lr <= --lr "
                            f"(got {s.min_lr}, {s.constant_lr}, {s.max_lr})")
    anneal = s.end_steps - s.warmup_steps - s.cooldown_steps - s.constant_steps
    if anneal <= 0:
        raise ScheduleError(f"infinite-* schedules need a final anneal phase: end ({s.end_steps}) - warmup "
                            f"({s.warmup_steps}) - cooldown ({s.cooldown_steps}) - constant ({s.constant_steps}) "
                            f"= {anneal} {s.unit} must be > 0; lower --lr-cooldown-fraction/--lr-constant-fraction "
                            "or the warmup")


def _validate_infinite_inv_sqrt(s: ScheduleSpec) -> None:
    _validate_infinite(s)
    if not s.timescale > 0.0:
        raise ScheduleError(f"--timescale must be > 0 (got {s.timescale})")


def _infinite(spec: ScheduleSpec, step: int, phase1: Callable[[float], float]) -> float:
    """Shared by the infinite styles: max -> c over Cd (shape ``phase1``), plateau c over Kc,
    then exponential anneal from c to min at E."""
    if step > spec.decay_steps:
        return spec.min_lr
    c, Cd, Kc = spec.constant_lr, spec.cooldown_steps, spec.constant_steps
    n = step - spec.warmup_steps
    if n <= Cd:
        r = n / Cd if Cd > 0 else 1.0
        lr = phase1(r)
    else:
        n2 = n - Cd
        if n2 <= Kc:
            lr = c
        else:
            k = -math.log(spec.min_lr / c) / (spec.end_steps - spec.warmup_steps - Cd - Kc)
            lr = c * math.exp(-k * (n2 - Kc))
    return max(lr, spec.min_lr)


@register_schedule("infinite-cosine", "cosine --lr -> --constant-lr, plateau, exponential anneal to --min-lr",
                   validate=_validate_infinite)
def _infinite_cosine(spec: ScheduleSpec, step: int) -> float:
    delta = spec.max_lr - spec.constant_lr
    return _infinite(spec, step, lambda r: spec.constant_lr + delta * 0.5 * (1.0 + math.cos(math.pi * r)))


@register_schedule("infinite-inv-square-root",
                   "inverse-sqrt --lr -> --constant-lr (--timescale), plateau, exponential anneal to --min-lr",
                   validate=_validate_infinite_inv_sqrt)
def _infinite_inv_square_root(spec: ScheduleSpec, step: int) -> float:
    delta = spec.max_lr - spec.constant_lr
    tau = spec.timescale

    def f(t: float) -> float:
        return 1.0 / math.sqrt(1.0 + tau * t) - 1.0

    return _infinite(spec, step, lambda r: spec.max_lr - delta * f(r) / f(1.0))


def _validate_wsd(s: ScheduleSpec) -> None:
    if s.wsd_decay_style not in DECAY_SHAPES:
        raise ScheduleError(f"unknown --lr-wsd-decay-style {s.wsd_decay_style!r}; choose one of {', '.join(DECAY_SHAPES)}")
    if not 0 < s.wsd_decay_steps <= s.decay_steps - s.warmup_steps:
        raise ScheduleError(f"wsd needs 0 < decay length ({s.wsd_decay_steps} {s.unit}) <= decay span - warmup "
                            f"({s.decay_steps} - {s.warmup_steps} = {s.decay_steps - s.warmup_steps} {s.unit}); "
                            "set --lr-wsd-decay-iters or --lr-cooldown-iters")


@register_schedule("wsd", "warmup-stable-decay: --lr, then a final decay (--lr-wsd-decay-style) to --min-lr",
                   validate=_validate_wsd)
def _wsd(spec: ScheduleSpec, step: int) -> float:
    """Warmup-stable-decay: max until D - wsd_decay_steps, then decay to min at D."""
    if step > spec.decay_steps:
        return spec.min_lr
    start = spec.decay_steps - spec.wsd_decay_steps
    if step <= start:
        return spec.max_lr
    return _decay(spec, spec.wsd_decay_style, (step - start) / spec.wsd_decay_steps)
