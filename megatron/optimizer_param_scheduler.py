"""Learning-rate and weight-decay schedules.

Two layers:

* pure functions: ``lr_at(spec, step)`` and ``wd_at(...)``. Every LR style is one entry of
  the ``LR_SCHEDULES`` registry (``name -> fn(spec, step)``); ``lr_at`` applies the
  linear warmup and then the registry function. Adding a style is one function decorated
  with ``@register_schedule("name")`` plus its validation (if any) in ``ScheduleSpec``.
* ``OptimizerParamScheduler``: the small stateful object DeepSpeed drives. DeepSpeed
  calls ``step(**lr_kwargs)`` after every applied optimizer step (the trainer passes
  ``lr_kwargs={"increment": global_batch_size}``), ``state_dict()`` when it saves a
  checkpoint and ``load_state_dict()`` when it loads one.

Units: every "steps" quantity in a ``ScheduleSpec`` is counted in the scheduler's *unit*,
``"samples"`` (the default; iteration-based training advances the counter by the global
batch size per iteration) or ``"tokens"`` (``--lr-decay-tokens``; the counter advances
by the number of tokens per iteration, see ``scheduler_increment``).

The math follows upstream ALCF Megatron-DeepSpeed (``ALCF/notes/schedulers.md`` has the
formulas and the list of upstream bugs fixed here).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)

__all__ = [
    "ScheduleSpec",
    "LR_SCHEDULES",
    "DECAY_SHAPES",
    "WD_INCR_STYLES",
    "register_schedule",
    "lr_at",
    "wd_at",
    "OptimizerParamScheduler",
    "build_schedule_spec",
    "build_scheduler",
    "scheduler_increment",
]

UNITS = ("samples", "tokens")
INFINITE_STYLES = ("infinite-cosine", "infinite-inv-square-root")

# Shapes of a decay from 1 to 0 over progress r in [0, 1] (used by linear, cosine, wsd).
DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda r: 1.0 - r,
    "cosine": lambda r: 0.5 * (1.0 + math.cos(math.pi * r)),
    "1-sqrt": lambda r: 1.0 - math.sqrt(r),
}

WD_INCR_STYLES = ("constant", "linear", "cosine")
_WSD_STYLE_ALIASES = {"minus_sqrt": "1-sqrt"}  # Megatron-LM's spelling


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
        _validate_spec(self)


def _validate_spec(s: ScheduleSpec) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"LR schedule: {msg}")

    if s.decay_style not in LR_SCHEDULES:
        fail(f"unknown --lr-decay-style {s.decay_style!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if s.unit not in UNITS:
        fail(f"unit must be one of {UNITS}, got {s.unit!r}")
    if s.max_lr is None or not s.max_lr >= 0.0:
        fail(f"--lr must be given and >= 0 (got {s.max_lr})")
    if not 0.0 <= s.min_lr <= s.max_lr:
        fail(f"need 0 <= --min-lr <= --lr (got --min-lr {s.min_lr}, --lr {s.max_lr})")
    for name in ("warmup_steps", "decay_steps", "end_steps", "constant_steps", "cooldown_steps",
                 "constant_plus_cooldown_steps", "wsd_decay_steps"):
        if getattr(s, name) < 0:
            fail(f"{name} must be >= 0 (got {getattr(s, name)})")
    W, D, E = s.warmup_steps, s.decay_steps, s.end_steps
    if W > D:
        fail(f"the warmup ({W} {s.unit}) is longer than the decay span ({D} {s.unit}); "
             "shorten --lr-warmup-* or lengthen --lr-decay-*/--train-*")
    if D == 0 and not (s.decay_style == "constant" and s.constant_plus_cooldown_steps == 0):
        fail(f"the decay span is 0 {s.unit}; set --train-iters/--lr-decay-iters (or samples/tokens)")
    if s.decay_style == "constant" and s.constant_plus_cooldown_steps > 0:
        Cc = s.constant_plus_cooldown_steps
        if Cc > min(D, E) - W:
            fail(f"the constant+cooldown cooldown ({Cc} {s.unit}) is longer than the span after warmup "
                 f"({min(D, E) - W} {s.unit} = decay span {min(D, E)} - warmup {W}); "
                 "lower --lr_constant_plus_cooldown_frac / --lr-cooldown-iters or the warmup")
    if s.decay_style in INFINITE_STYLES:
        if not s.min_lr > 0.0:
            fail(f"--min-lr must be > 0 for infinite-* schedules (got {s.min_lr}); their final "
                 "phase anneals exponentially towards it")
        if not s.min_lr < s.constant_lr <= s.max_lr:
            fail(f"infinite-* schedules need --min-lr < --constant-lr <= --lr "
                 f"(got {s.min_lr}, {s.constant_lr}, {s.max_lr})")
        anneal = E - W - s.cooldown_steps - s.constant_steps
        if anneal <= 0:
            fail(f"infinite-* schedules need a final anneal phase: end ({E}) - warmup ({W}) - "
                 f"cooldown ({s.cooldown_steps}) - constant ({s.constant_steps}) = {anneal} {s.unit} "
                 "must be > 0; lower --lr-cooldown-fraction/--lr-constant-fraction or the warmup")
        if s.decay_style == "infinite-inv-square-root" and not s.timescale > 0.0:
            fail(f"--timescale must be > 0 (got {s.timescale})")
    if s.decay_style == "wsd":
        if s.wsd_decay_style not in DECAY_SHAPES:
            fail(f"unknown --lr-wsd-decay-style {s.wsd_decay_style!r}; choose one of {', '.join(DECAY_SHAPES)}")
        if not 0 < s.wsd_decay_steps <= D - W:
            fail(f"wsd needs 0 < decay length ({s.wsd_decay_steps} {s.unit}) <= decay span - warmup "
                 f"({D} - {W} = {D - W} {s.unit}); set --lr-wsd-decay-iters or --lr-cooldown-iters")


# ---------------------------------------------------------------------------------------
# Registry of LR styles. Each function gets the step N (> W, or any N when W == 0) and
# returns the post-warmup LR; ``lr_at`` handles the warmup.
# ---------------------------------------------------------------------------------------

LRFn = Callable[[ScheduleSpec, int], float]
LR_SCHEDULES: dict[str, LRFn] = {}


def register_schedule(name: str) -> Callable[[LRFn], LRFn]:
    """Decorator: ``@register_schedule("my-style") def f(spec, step) -> lr``."""

    def deco(fn: LRFn) -> LRFn:
        if name in LR_SCHEDULES:
            raise ValueError(f"LR schedule {name!r} is already registered")
        LR_SCHEDULES[name] = fn
        return fn

    return deco


def lr_at(spec: ScheduleSpec, step: int) -> float:
    """LR after ``step`` units have been consumed: linear warmup, then the style's function."""
    W = spec.warmup_steps
    if W > 0 and step <= W:
        return spec.max_lr * float(step) / float(W)
    return LR_SCHEDULES[spec.decay_style](spec, step)


def _decay(spec: ScheduleSpec, shape: str, r: float) -> float:
    return spec.min_lr + DECAY_SHAPES[shape](r) * (spec.max_lr - spec.min_lr)


@register_schedule("constant")
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


@register_schedule("linear")
def _linear(spec: ScheduleSpec, step: int) -> float:
    if step > spec.decay_steps:
        return spec.min_lr
    W = spec.warmup_steps
    return _decay(spec, "linear", (step - W) / (spec.decay_steps - W))


@register_schedule("cosine")
def _cosine(spec: ScheduleSpec, step: int) -> float:
    if step > spec.decay_steps:
        return spec.min_lr
    W = spec.warmup_steps
    return _decay(spec, "cosine", (step - W) / (spec.decay_steps - W))


@register_schedule("inverse-square-root")
def _inverse_square_root(spec: ScheduleSpec, step: int) -> float:
    if step > spec.decay_steps:
        return spec.min_lr
    lr = spec.max_lr * math.sqrt(max(spec.warmup_steps, 1)) / math.sqrt(max(step, 1))
    return max(spec.min_lr, lr)


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


@register_schedule("infinite-cosine")
def _infinite_cosine(spec: ScheduleSpec, step: int) -> float:
    delta = spec.max_lr - spec.constant_lr
    return _infinite(spec, step, lambda r: spec.constant_lr + delta * 0.5 * (1.0 + math.cos(math.pi * r)))


@register_schedule("infinite-inv-square-root")
def _infinite_inv_square_root(spec: ScheduleSpec, step: int) -> float:
    delta = spec.max_lr - spec.constant_lr
    tau = spec.timescale

    def f(t: float) -> float:
        return 1.0 / math.sqrt(1.0 + tau * t) - 1.0

    return _infinite(spec, step, lambda r: spec.max_lr - delta * f(r) / f(1.0))


@register_schedule("wsd")
def _wsd(spec: ScheduleSpec, step: int) -> float:
    """Warmup-stable-decay: max until D - wsd_decay_steps, then decay to min at D."""
    if step > spec.decay_steps:
        return spec.min_lr
    start = spec.decay_steps - spec.wsd_decay_steps
    if step <= start:
        return spec.max_lr
    return _decay(spec, spec.wsd_decay_style, (step - start) / spec.wsd_decay_steps)


# ---------------------------------------------------------------------------------------
# Weight decay
# ---------------------------------------------------------------------------------------


def _validate_wd(start_wd: float, end_wd: float, incr_steps: int, style: str) -> None:
    if style not in WD_INCR_STYLES:
        raise ValueError(f"unknown --weight-decay-incr-style {style!r}; choose one of {', '.join(WD_INCR_STYLES)}")
    if start_wd < 0.0 or end_wd < 0.0:
        raise ValueError(f"weight decay must be >= 0 (start {start_wd}, end {end_wd})")
    if style == "constant" and start_wd != end_wd:
        raise ValueError(f"--weight-decay-incr-style constant needs --start-weight-decay == --end-weight-decay "
                         f"(got {start_wd} and {end_wd})")
    if style != "constant" and incr_steps <= 0:
        raise ValueError(f"--weight-decay-incr-style {style} needs a positive increment span (got {incr_steps})")


def wd_at(start_wd: float, end_wd: float, incr_steps: int, style: str, step: int) -> float:
    """Weight decay after ``step`` units: start -> end over ``incr_steps`` (constant/linear/cosine)."""
    if step > incr_steps or style == "constant":
        return end_wd
    r = step / incr_steps
    if style == "linear":
        coeff = r
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * (1.0 - r)) + 1.0)
    else:
        raise ValueError(f"unknown weight-decay increment style {style!r}")
    return start_wd + coeff * (end_wd - start_wd)


# ---------------------------------------------------------------------------------------
# The stateful scheduler
# ---------------------------------------------------------------------------------------

# state_dict key -> ScheduleSpec field (the curve) ...
_SPEC_KEYS = {
    "max_lr": "max_lr",
    "min_lr": "min_lr",
    "lr_warmup_steps": "warmup_steps",
    "lr_decay_steps": "decay_steps",
    "lr_decay_style": "decay_style",
    "end_steps": "end_steps",
    "constant_lr": "constant_lr",
    "lr_constant_steps": "constant_steps",
    "lr_cooldown_steps": "cooldown_steps",
    "lr_constant_plus_cooldown_steps": "constant_plus_cooldown_steps",
    "timescale": "timescale",
    "wsd_decay_steps": "wsd_decay_steps",
    "wsd_decay_style": "wsd_decay_style",
}
# ... and the weight-decay fields (attributes of the scheduler).
_WD_KEYS = ("start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")

# Legacy / upstream spellings -> current key. As upstream does, a legacy key present in the
# state wins over the current spelling; among the legacy keys the first listed wins.
_LEGACY_KEYS = {
    "max_lr": ("start_lr",),
    "lr_warmup_steps": ("warmup_iter", "warmup_steps"),
    "lr_decay_steps": ("end_iter", "decay_steps"),
    "lr_decay_style": ("decay_style",),
    "num_steps": ("num_iters",),
    "lr_warmup_tokens": ("warmup_tokens",),
    "lr_decay_tokens": ("decay_tokens",),
}


def _normalize_state(sd: dict) -> dict:
    """Map a (possibly legacy or upstream) scheduler state dict onto the current keys."""
    out = dict(sd)
    for key, olds in _LEGACY_KEYS.items():
        for old in olds:
            if old in sd:
                out[key] = sd[old]  # upstream reads the legacy key first
                break
    unit = out.get("unit")
    if unit is None:  # written by upstream: token mode iff lr_decay_tokens was set
        unit = "tokens" if out.get("lr_decay_tokens") is not None else "samples"
        if unit == "tokens":
            out["lr_decay_steps"] = out["lr_decay_tokens"]
            if out.get("lr_warmup_tokens") is not None:
                out["lr_warmup_steps"] = out["lr_warmup_tokens"]
            else:
                out.pop("lr_warmup_steps", None)  # upstream warmup was counted in samples
            out["num_steps"] = out.get("num_tokens")
    out["unit"] = unit
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


class OptimizerParamScheduler:
    """Sets every param group's ``lr`` and ``weight_decay`` from the schedules.

    ``step(increment)`` advances the counter by ``increment`` units and writes
    ``lr * group.get("lr_mult", 1)`` and ``wd * group.get("wd_mult", 1)`` into each group.
    ``increment`` has no default on purpose: DeepSpeed's pipeline engine calls ``step()``
    without arguments and relies on the resulting TypeError to retry with
    ``step(train_batch_size)``.
    """

    def __init__(
        self,
        optimizer: Any,
        spec: ScheduleSpec,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: int,
        wd_incr_style: str = "constant",
        use_checkpoint_opt_param_scheduler: bool = False,
        override_opt_param_scheduler: bool = False,
    ) -> None:
        if use_checkpoint_opt_param_scheduler and override_opt_param_scheduler:
            raise ValueError(
                "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually "
                "exclusive (train_alcf.sh adds --use-checkpoint-opt_param-scheduler unless "
                "OVERRIDE_CKPT_OPT_PARAM=1 is exported)")
        _validate_wd(start_wd, end_wd, wd_incr_steps, wd_incr_style)
        self.optimizer = optimizer
        self.spec = spec
        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        self.wd_incr_steps = int(wd_incr_steps)
        self.wd_incr_style = wd_incr_style
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.num_steps = 0
        self.step(0)  # the first optimizer step runs at lr_at(0) (= 0 with a warmup)

    @property
    def unit(self) -> str:
        return self.spec.unit

    def get_lr(self) -> float:
        """LR (before lr_mult) for the next optimizer step."""
        return lr_at(self.spec, self.num_steps)

    def get_wd(self) -> float:
        """Weight decay (before wd_mult) for the next optimizer step."""
        return wd_at(self.start_wd, self.end_wd, self.wd_incr_steps, self.wd_incr_style, self.num_steps)

    def get_last_lr(self) -> list[float]:
        """Per-group LRs last written into the optimizer (the torch scheduler API)."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def _apply(self) -> None:
        lr, wd = self.get_lr(), self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def step(self, increment: int) -> None:
        """Advance by ``increment`` units (samples or tokens) and update the optimizer."""
        increment = int(increment)
        if increment < 0:
            raise ValueError(f"scheduler increment must be >= 0, got {increment}")
        self.num_steps += increment
        self._apply()

    # --- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict:
        s = self.spec
        sd: dict[str, Any] = {key: getattr(s, field) for key, field in _SPEC_KEYS.items()}
        sd.update({key: getattr(self, key) for key in _WD_KEYS})
        tokens = s.unit == "tokens"
        sd.update(
            num_steps=self.num_steps,
            unit=s.unit,
            # upstream's token-mode keys, filled when this scheduler counts tokens
            num_tokens=self.num_steps if tokens else None,
            lr_warmup_tokens=s.warmup_steps if tokens else None,
            lr_decay_tokens=s.decay_steps if tokens else None,
        )
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restore the step counter and resolve every schedule setting, command line vs checkpoint.

        * ``override_opt_param_scheduler``: the command-line values are kept;
        * ``use_checkpoint_opt_param_scheduler`` (what train_alcf.sh passes): the checkpoint's win;
        * neither: they must be equal, otherwise ValueError naming the fields and both flags.

        Settings missing from the checkpoint (legacy/upstream formats) keep the command-line
        value. Then ``num_steps`` is set to the checkpoint's and LR/WD are re-applied.
        """
        ck = _normalize_state(sd)
        if ck["unit"] != self.unit:
            raise ValueError(
                f"the checkpoint's LR scheduler counts {ck['unit']} but this run counts {self.unit} "
                "(--lr-decay-tokens switches to tokens); the step counter cannot be converted")
        if ck.get("num_steps") is None:
            raise ValueError("scheduler state has no step counter (num_steps)")

        cli: dict[str, Any] = {key: getattr(self.spec, field) for key, field in _SPEC_KEYS.items()}
        cli.update({key: getattr(self, key) for key in _WD_KEYS})
        # Keys absent from the checkpoint (older formats) keep the CLI value; the others are cast
        # to the field's type first (upstream stored fractional step counts as floats).
        saved = {k: _like(v, ck[k]) for k, v in cli.items() if ck.get(k) is not None}
        differ = {k: (v, saved[k]) for k, v in cli.items() if k in saved and not _same(v, saved[k])}

        if self.override_opt_param_scheduler:
            resolved = cli
            if differ:
                logger.info("--override-opt_param-scheduler: keeping command-line scheduler values over the "
                            "checkpoint's for %s", _describe(differ))
        elif self.use_checkpoint_opt_param_scheduler:
            resolved = {k: (saved[k] if k in differ else v) for k, v in cli.items()}
            if differ:
                logger.warning("--use-checkpoint-opt_param-scheduler: the checkpoint's scheduler values replace "
                               "the command line's for %s", _describe(differ))
        else:
            if differ:
                raise ValueError(
                    "LR scheduler settings differ between the command line and the checkpoint: "
                    f"{_describe(differ)}. Pass --override-opt_param-scheduler to use the command-line "
                    "values or --use-checkpoint-opt_param-scheduler to use the checkpoint's.")
            resolved = cli

        new_spec = dataclasses.replace(self.spec, **{field: resolved[key] for key, field in _SPEC_KEYS.items()})
        _validate_wd(resolved["start_wd"], resolved["end_wd"], resolved["wd_incr_steps"], resolved["wd_incr_style"])
        self.spec = new_spec  # (replace() re-ran the spec validation)
        self.start_wd, self.end_wd = resolved["start_wd"], resolved["end_wd"]
        self.wd_incr_steps, self.wd_incr_style = resolved["wd_incr_steps"], resolved["wd_incr_style"]
        self.num_steps = int(ck["num_steps"])
        self._apply()


def _like(template: Any, value: Any) -> Any:
    """Cast a checkpoint value to the type of the spec field (upstream stored some step counts as floats)."""
    if isinstance(template, bool) or isinstance(template, str):
        return value
    if isinstance(template, int):
        return int(round(float(value)))
    if isinstance(template, float):
        return float(value)
    return value


def _describe(differ: dict) -> str:
    return ", ".join(f"{k} (command line {a!r}, checkpoint {b!r})" for k, (a, b) in differ.items())


# ---------------------------------------------------------------------------------------
# Construction from the parsed arguments (upstream attribute names)
# ---------------------------------------------------------------------------------------


def _arg(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


def _seq_length(args: Any) -> int:
    seq = _arg(args, "seq_length")
    if not seq:
        raise ValueError("token-based LR schedules (--lr-decay-tokens) need --seq-length")
    return int(seq)


def scheduler_increment(args: Any) -> int:
    """Units consumed per iteration: the global batch size in samples, times seq_length in token mode.

    The trainer passes ``lr_kwargs={"increment": scheduler_increment(args)}`` to ``engine.step``.
    """
    gbs = int(args.global_batch_size)
    if _arg(args, "lr_decay_tokens") is not None:
        return gbs * _seq_length(args)
    return gbs


def build_schedule_spec(args: Any) -> ScheduleSpec:
    """Translate upstream-named arguments into a ScheduleSpec (units of ``scheduler_increment``)."""
    gbs = int(args.global_batch_size)
    style = _arg(args, "lr_decay_style", "linear")
    tokens_mode = _arg(args, "lr_decay_tokens") is not None
    train_iters = _arg(args, "train_iters")
    train_samples = _arg(args, "train_samples")
    if _arg(args, "lr") is None:
        raise ValueError("--lr is required")

    unit = "tokens" if tokens_mode else "samples"
    per_sample = _seq_length(args) if tokens_mode else 1  # units per sample
    per_iter = gbs * per_sample  # units per iteration

    # Decay span D.
    if tokens_mode:
        D = int(args.lr_decay_tokens)
    elif _arg(args, "lr_decay_iters") is not None:
        D = int(args.lr_decay_iters) * per_iter
    elif _arg(args, "lr_decay_samples") is not None:
        D = int(args.lr_decay_samples) * per_sample
    elif train_iters is not None:
        D = int(train_iters) * per_iter
    elif train_samples is not None:
        D = int(train_samples) * per_sample
    else:
        raise ValueError("the LR schedule needs --train-iters or --train-samples (or --lr-decay-*)")

    # Warmup W.
    frac = _arg(args, "lr_warmup_fraction")
    warmup_iters = int(_arg(args, "lr_warmup_iters", 0))
    warmup_samples = int(_arg(args, "lr_warmup_samples", 0))
    warmup_tokens = _arg(args, "lr_warmup_tokens")
    if frac is not None and (warmup_iters or warmup_samples or warmup_tokens is not None):
        raise ValueError("give either --lr-warmup-fraction or --lr-warmup-iters/-samples/-tokens, not both")
    if frac is not None:
        W = round(float(frac) * D)
    elif tokens_mode and warmup_tokens is not None:
        W = int(warmup_tokens)
    elif warmup_iters:
        W = warmup_iters * per_iter
    else:
        W = warmup_samples * per_sample

    # Infinite styles: plateau Kc and max->c phase Cd.
    constant_tokens = _arg(args, "lr_constant_tokens")
    cooldown_tokens = _arg(args, "lr_cooldown_tokens")
    Kc = int(constant_tokens) if tokens_mode and constant_tokens is not None else \
        round(float(_arg(args, "lr_constant_fraction", 0.001)) * D)
    Cd = int(cooldown_tokens) if tokens_mode and cooldown_tokens is not None else \
        round(float(_arg(args, "lr_cooldown_fraction", 0.65)) * D)

    # Final cooldown, stated as a fraction of D, as the last R iterations, or as a start iteration S.
    cooldown_iters = _arg(args, "lr_cooldown_iters")
    cooldown_start = _arg(args, "lr_cooldown_start_iter")
    if cooldown_iters is not None and cooldown_start is not None:
        raise ValueError("give either --lr-cooldown-iters or --lr-cooldown-start-iter, not both")
    explicit_cooldown = None
    if cooldown_iters is not None:
        explicit_cooldown = int(cooldown_iters) * per_iter
    elif cooldown_start is not None:
        explicit_cooldown = D - int(cooldown_start) * per_iter
        if explicit_cooldown <= 0:
            raise ValueError(f"--lr-cooldown-start-iter {cooldown_start} is at or after the end of the decay "
                             f"span ({D // per_iter} iterations)")

    plus_cooldown = bool(_arg(args, "lr_constant_plus_cooldown", False))
    if (plus_cooldown or explicit_cooldown is not None) and style not in ("constant", "wsd"):
        raise ValueError(f"--lr_constant_plus_cooldown / --lr-cooldown-iters / --lr-cooldown-start-iter apply to "
                         f"--lr-decay-style constant (or wsd), not {style!r}")
    if plus_cooldown and style == "wsd":
        raise ValueError("--lr_constant_plus_cooldown applies to --lr-decay-style constant; wsd has its own decay "
                         "(--lr-wsd-decay-iters)")
    Cc = 0
    if style == "constant":
        if explicit_cooldown is not None:
            Cc = explicit_cooldown
        elif plus_cooldown:
            Cc = round(float(_arg(args, "lr_constant_plus_cooldown_frac", 0.05)) * D)

    wsd_style = _arg(args, "lr_wsd_decay_style", "1-sqrt")
    wsd_style = _WSD_STYLE_ALIASES.get(wsd_style, wsd_style)
    wsd_steps = 0
    if style == "wsd":
        if _arg(args, "lr_wsd_decay_iters") is not None:
            wsd_steps = int(args.lr_wsd_decay_iters) * per_iter
        elif _arg(args, "lr_wsd_decay_samples") is not None:
            wsd_steps = int(args.lr_wsd_decay_samples) * per_sample
        elif explicit_cooldown is not None:
            wsd_steps = explicit_cooldown
        else:
            raise ValueError("--lr-decay-style wsd needs the decay length: --lr-wsd-decay-iters, "
                             "--lr-cooldown-iters or --lr-cooldown-start-iter")

    return ScheduleSpec(
        max_lr=float(args.lr),
        min_lr=float(_arg(args, "min_lr", 0.0)),
        warmup_steps=int(W),
        decay_steps=int(D),
        end_steps=int(D),
        decay_style=style,
        constant_lr=float(_arg(args, "constant_lr", 0.00011)),
        constant_steps=int(Kc),
        cooldown_steps=int(Cd),
        constant_plus_cooldown_steps=int(Cc),
        timescale=float(_arg(args, "timescale", 10.0)),
        wsd_decay_steps=int(wsd_steps),
        wsd_decay_style=wsd_style,
        unit=unit,
    )


def build_scheduler(optimizer: Any, args: Any) -> OptimizerParamScheduler:
    """The scheduler the trainer hands to ``deepspeed.initialize(lr_scheduler=...)``."""
    spec = build_schedule_spec(args)
    per_sample = _seq_length(args) if spec.unit == "tokens" else 1
    if _arg(args, "train_iters") is not None:
        wd_incr_steps = int(args.train_iters) * int(args.global_batch_size) * per_sample
    elif _arg(args, "train_samples") is not None:
        wd_incr_steps = int(args.train_samples) * per_sample
    else:
        wd_incr_steps = spec.decay_steps
    wd = float(_arg(args, "weight_decay", 0.0))
    return OptimizerParamScheduler(
        optimizer,
        spec,
        start_wd=float(_arg(args, "start_weight_decay", wd)),
        end_wd=float(_arg(args, "end_weight_decay", wd)),
        wd_incr_steps=wd_incr_steps,
        wd_incr_style=_arg(args, "weight_decay_incr_style", "constant"),
        use_checkpoint_opt_param_scheduler=bool(_arg(args, "use_checkpoint_opt_param_scheduler", False)),
        override_opt_param_scheduler=bool(_arg(args, "override_opt_param_scheduler", False)),
    )
