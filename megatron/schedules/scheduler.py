"""The stateful scheduler DeepSpeed drives, and the weight-decay schedule.

DeepSpeed calls ``step(**lr_kwargs)`` after every applied optimizer step (the trainer passes
``lr_kwargs={"increment": ...}``, megatron/schedules/build.py), ``state_dict()`` when it saves a
checkpoint and ``load_state_dict()`` when it loads one.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from megatron.schedules.styles import ScheduleSpec, lr_at

logger = logging.getLogger(__name__)

WD_INCR_STYLES = ("constant", "linear", "cosine")


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


# state_dict key -> ScheduleSpec field (the curve) ...
SPEC_KEYS = {
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


def normalize_state(sd: dict) -> dict:
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
        sd: dict[str, Any] = {key: getattr(s, field) for key, field in SPEC_KEYS.items()}
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
        ck = normalize_state(sd)
        if ck["unit"] != self.unit:
            raise ValueError(
                f"the checkpoint's LR scheduler counts {ck['unit']} but this run counts {self.unit} "
                "(--lr-decay-tokens switches to tokens); the step counter cannot be converted")
        if ck.get("num_steps") is None:
            raise ValueError("scheduler state has no step counter (num_steps)")

        cli: dict[str, Any] = {key: getattr(self.spec, field) for key, field in SPEC_KEYS.items()}
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

        new_spec = dataclasses.replace(self.spec, **{field: resolved[key] for key, field in SPEC_KEYS.items()})
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
