"""LR range test (``--lr-finder``): sweep the LR geometrically, record the smoothed loss, suggest an LR.

The finder is two things in one object, :class:`LRFinder`:

* a scheduler: it replaces the regular LR scheduler (``deepspeed.initialize(lr_scheduler=...)``),
  so DeepSpeed advances it after every applied optimizer step. Step ``k`` (0-based) of the
  sweep runs at ``lr_k = lr_min * (lr_max / lr_min) ** (k / (n - 1))``, times each parameter
  group's ``lr_mult`` (so MuP/CompleteP per-group multipliers stay in force and the suggested
  value is the ``--lr`` of a later run);
* a recorder: the training loop calls ``record(iteration, loss)`` after each iteration. It keeps
  the bias-corrected exponential moving average of the loss and answers True when the sweep is
  over (all ``n`` steps done, or the smoothed loss exceeded ``stop_factor`` x its best value, or
  is not finite). ``finish()`` writes ``lr_finder_data.csv``, ``lr_finder_data.npz`` and
  ``lr_finder.png`` and prints the suggested LRs.

The pure functions ``sweep_lrs``, ``smooth_losses`` and ``suggest_lr`` hold the math; the
user-facing description is in ``ALCF/notes/lr_finder.md``.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from megatron.config import Config, ScheduleConfig, TrainingConfig

log = logging.getLogger(__name__)

__all__ = [
    "FinderSettings",
    "Suggestion",
    "LRFinder",
    "sweep_lrs",
    "smooth_losses",
    "suggest_lr",
    "configure_lr_finder",
    "build_lr_finder",
    "build_lr_scheduler",
    "active_lr_finder",
    "CSV_NAME",
    "NPZ_NAME",
    "PNG_NAME",
]

OUT_SUBDIR = "lr_finder"
CSV_NAME = "lr_finder_data.csv"
NPZ_NAME = "lr_finder_data.npz"
PNG_NAME = "lr_finder.png"


# ----------------------------------------------------------------------------- pure math
def sweep_lrs(min_lr: float, max_lr: float, num_steps: int) -> np.ndarray:
    """Geometric sweep of ``num_steps`` LRs from ``min_lr`` to ``max_lr`` (both included)."""
    if num_steps < 1:
        raise ValueError(f"the LR sweep needs at least 1 step, got {num_steps}")
    if num_steps == 1:
        return np.array([float(min_lr)])
    return float(min_lr) * (float(max_lr) / float(min_lr)) ** (np.arange(num_steps) / (num_steps - 1))


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> np.ndarray:
    """Bias-corrected exponential moving average: ``a_k = beta a_{k-1} + (1 - beta) x_k`` with
    ``a_0 = 0``, reported as ``a_k / (1 - beta**k)`` (k = 1, 2, ...)."""
    out = np.empty(len(losses))
    avg = 0.0
    for k, x in enumerate(losses, start=1):
        avg = beta * avg + (1.0 - beta) * float(x)
        out[k - 1] = avg / (1.0 - beta**k)
    return out


@dataclass(frozen=True)
class Suggestion:
    """Suggested LRs from a sweep.

    ``steepest_lr``: where the smoothed loss falls fastest per decade of LR (the most negative
    d loss / d log10 lr, searched up to the loss minimum). ``min_loss_lr``: the LR at the lowest
    smoothed loss; ``min_loss_lr / 10`` is the classic conservative pick.
    """

    steepest_lr: float
    min_loss_lr: float
    min_loss: float

    @property
    def min_loss_lr_div10(self) -> float:
        return self.min_loss_lr / 10.0


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float]) -> Suggestion:
    """Suggestions from the finite prefix of the smoothed curve (a diverged tail is ignored)."""
    lrs, smoothed = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    if lrs.shape != smoothed.shape or lrs.size == 0:
        raise ValueError("suggest_lr needs equally long, non-empty lrs and losses")
    finite = np.isfinite(smoothed)
    n = int(np.argmin(finite)) if not finite.all() else len(smoothed)  # length of the finite prefix
    if n == 0:
        raise ValueError("the first smoothed loss is not finite: the sweep started too high or the model is broken")
    lrs, smoothed = lrs[:n], smoothed[:n]
    i_min = int(np.argmin(smoothed))
    if i_min == 0 or n < 2:
        steep = 0
    else:
        grads = np.gradient(smoothed, np.log10(lrs))
        steep = int(np.argmin(grads[: i_min + 1]))
    return Suggestion(float(lrs[steep]), float(lrs[i_min]), float(smoothed[i_min]))


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class FinderSettings:
    num_steps: int
    min_lr: float = 1e-6
    max_lr: float = 1.0
    beta: float = 0.98
    stop_factor: float = 4.0
    out_dir: str = OUT_SUBDIR
    weight_decay: float = 0.0
    log_interval: int = 1


def finder_steps(schedule: ScheduleConfig, training: TrainingConfig) -> int:
    """Sweep length: ``int(--lr-finder-fraction x TRAIN_ITERS)`` (upstream used a fixed 0.1)."""
    return int(schedule.lr_finder_fraction * training.train_iters)


def configure_lr_finder(config: Config) -> tuple[list[str], dict]:
    """Check the ``--lr-finder-*`` flags and work out how a range test changes the validated config.

    Outputs go to ``{--save}/lr_finder/`` (or ``./lr_finder/`` without ``--save``); ``--save``
    is then cleared so no checkpoint is written, evaluation is switched off (a model swept to
    a huge LR is not worth evaluating) and the metrics file defaults to the finder directory.
    Returns (problems, changes): the problems (empty when fine) and the fields to set (flat names;
    the argument adapter sets them).
    """
    sched, training, out = config.schedule, config.training, config.logging
    errs = []
    lo, hi = sched.lr_finder_min, sched.lr_finder_max
    if not (lo > 0 and math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        errs.append(f"--lr-finder-min ({lo}) and --lr-finder-max ({hi}) must satisfy 0 < min < max")
    if not 0.0 < sched.lr_finder_fraction <= 1.0:
        errs.append(f"--lr-finder-fraction must be in (0, 1] (got {sched.lr_finder_fraction})")
    elif training.train_iters is not None and finder_steps(sched, training) < 2:
        errs.append(f"--lr-finder needs at least 2 steps; --lr-finder-fraction {sched.lr_finder_fraction} x "
                    f"TRAIN_ITERS {training.train_iters} gives {finder_steps(sched, training)}: raise TRAIN_ITERS")
    if not sched.lr_finder_stop_factor > 1.0:
        errs.append(f"--lr-finder-stop-factor must be > 1 (got {sched.lr_finder_stop_factor}); "
                    "give a large value (e.g. 1e9) to never stop early")
    if not 0.0 <= sched.lr_finder_beta < 1.0:
        errs.append(f"--lr-finder-beta must be in [0, 1) (got {sched.lr_finder_beta})")
    if errs:
        return errs, {}
    save = config.checkpoint.save
    out_dir = os.path.join(os.path.abspath(save) if save else os.getcwd(), OUT_SUBDIR)
    return [], {"lr_finder_dir": out_dir, "save": None, "save_interval": None, "eval_iters": 0,
                "eval_on_start": False,
                "metrics_file": out.metrics_file or os.path.join(out_dir, "metrics.jsonl"),
                "tensorboard_dir": out.tensorboard_dir or os.path.join(out_dir, "tensorboard")}


def build_lr_finder(optimizer: Any, config: Config) -> "LRFinder":
    """The finder that the trainer passes to DeepSpeed as its ``lr_scheduler``."""
    sched, opt = config.schedule, config.optimizer
    settings = FinderSettings(
        num_steps=finder_steps(sched, config.training), min_lr=sched.lr_finder_min, max_lr=sched.lr_finder_max,
        beta=sched.lr_finder_beta, stop_factor=sched.lr_finder_stop_factor, out_dir=config.runtime.lr_finder_dir,
        weight_decay=float(opt.start_weight_decay if opt.start_weight_decay is not None else opt.weight_decay),
        log_interval=config.logging.log_interval)
    return LRFinder(optimizer, settings, write_outputs=config.runtime.rank == 0)


def build_lr_scheduler(optimizer: Any, config: Config) -> Any:
    """The LR scheduler of a run: the range test with ``--lr-finder``, else the regular schedule."""
    if config.schedule.lr_finder:
        return build_lr_finder(optimizer, config)
    from megatron.schedules import build_scheduler  # noqa: PLC0415

    return build_scheduler(optimizer, config)


def active_lr_finder(engine: Any) -> "LRFinder | None":
    """The range test driving ``engine`` (its lr_scheduler), or None in a normal run."""
    sched = getattr(engine, "lr_scheduler", None)
    return sched if isinstance(sched, LRFinder) else None


# ----------------------------------------------------------------------------- the component
class LRFinder:
    """Scheduler (sets each group's LR along the sweep) + recorder (smoothed loss, early stop, outputs)."""

    def __init__(self, optimizer: Any, settings: FinderSettings, write_outputs: bool = True) -> None:
        self.optimizer = optimizer
        self.settings = settings
        self.write_outputs = write_outputs
        self.lrs = sweep_lrs(settings.min_lr, settings.max_lr, settings.num_steps)
        self.num_steps = 0  # optimizer steps applied so far
        self.recorded_lrs: list[float] = []
        self.raw_losses: list[float] = []
        self.smoothed: list[float] = []
        self.iterations: list[int] = []
        self.best = math.inf
        self.stop_reason: str | None = None
        self.suggestion: Suggestion | None = None
        self._avg = 0.0
        self._finished = False
        self._apply()

    # --- the scheduler side (what DeepSpeed calls) ---------------------------------------
    def get_lr(self) -> float:
        """Base LR (before lr_mult) of the next optimizer step."""
        return float(self.lrs[min(self.num_steps, len(self.lrs) - 1)])

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _apply(self) -> None:
        lr, wd = self.get_lr(), self.settings.weight_decay
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def step(self, increment: int | None = None, **_: Any) -> None:
        """Called by DeepSpeed after every applied optimizer step (skipped steps do not call it)."""
        self.num_steps += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"lr_finder": True, "num_steps": self.num_steps}

    def load_state_dict(self, sd: dict) -> None:
        """A checkpoint's scheduler state is ignored: every range test starts at --lr-finder-min."""
        log.info("LR finder: ignoring the checkpoint's LR scheduler state; the sweep starts at %.3g",
                 self.settings.min_lr)

    # --- the recorder side (what the training loop calls) --------------------------------
    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    def record(self, iteration: int, loss: Any) -> bool:
        """Record the loss of the iteration just run; True when the range test is over."""
        k = len(self.raw_losses)
        if self.num_steps == k:  # the optimizer step was skipped: nothing to record, LR not advanced
            return self.done
        s = self.settings
        x = float(loss)
        self._avg = s.beta * self._avg + (1.0 - s.beta) * x
        smoothed = self._avg / (1.0 - s.beta ** (k + 1))
        self.recorded_lrs.append(float(self.lrs[k]))
        self.raw_losses.append(x)
        self.smoothed.append(smoothed)
        self.iterations.append(int(iteration))
        if math.isfinite(smoothed):
            self.best = min(self.best, smoothed)
        if self.write_outputs and (k + 1) % s.log_interval == 0:
            print(f" LR finder: step {k + 1}/{s.num_steps} | lr {self.lrs[k]:.4e} | loss {x:.4f} | "
                  f"smoothed loss {smoothed:.4f}", flush=True)
        if not math.isfinite(smoothed):
            self.stop_reason = f"the loss is not finite at lr {self.lrs[k]:.3e}"
        elif smoothed > s.stop_factor * self.best:
            self.stop_reason = (f"the smoothed loss {smoothed:.4g} exceeded {s.stop_factor:g} x its best "
                                f"{self.best:.4g} at lr {self.lrs[k]:.3e}")
        elif k + 1 >= s.num_steps:
            self.stop_reason = f"the sweep reached --lr-finder-max after {s.num_steps} steps"
        return self.done

    def finish(self) -> Suggestion | None:
        """Write the CSV, NPZ and PNG (rank 0) and print the suggested LRs; safe to call twice."""
        if self._finished:
            return self.suggestion
        self._finished = True
        if not self.raw_losses:
            if self.write_outputs:
                print(" LR finder: no step was recorded; nothing written", flush=True)
            return None
        try:
            self.suggestion = suggest_lr(self.recorded_lrs, self.smoothed)
        except ValueError as e:
            log.error("LR finder: no suggestion: %s", e)
        if not self.write_outputs:
            return self.suggestion
        reason = self.stop_reason or f"the run ended after {len(self.raw_losses)} of {self.settings.num_steps} steps"
        out = self.settings.out_dir
        os.makedirs(out, exist_ok=True)
        self._write_csv(os.path.join(out, CSV_NAME))
        self._write_npz(os.path.join(out, NPZ_NAME))
        png = os.path.join(out, PNG_NAME)
        self._plot(png)
        print(f" LR finder: stopped because {reason}", flush=True)
        if self.suggestion is not None:
            sg = self.suggestion
            print(f" LR finder: suggested LR (steepest descent of the smoothed loss) = {sg.steepest_lr:.3e}",
                  flush=True)
            print(f" LR finder: suggested LR (min-loss LR / 10) = {sg.min_loss_lr_div10:.3e} "
                  f"(min smoothed loss {sg.min_loss:.4f} at lr {sg.min_loss_lr:.3e})", flush=True)
        print(f" LR finder: wrote {os.path.join(out, CSV_NAME)}, {NPZ_NAME}, {PNG_NAME} (no checkpoint)", flush=True)
        return self.suggestion

    # --- outputs ---------------------------------------------------------------------------
    def _write_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["learning_rate", "loss", "raw_loss", "iteration"])  # upstream's two columns first
            for row in zip(self.recorded_lrs, self.smoothed, self.raw_losses, self.iterations):
                w.writerow([repr(row[0]), repr(row[1]), repr(row[2]), row[3]])

    def _write_npz(self, path: str) -> None:
        sg = self.suggestion
        np.savez(path, learning_rates=np.array(self.recorded_lrs), losses=np.array(self.smoothed),
                 raw_losses=np.array(self.raw_losses), iterations=np.array(self.iterations),
                 suggested_lr_steepest=np.float64(sg.steepest_lr if sg else np.nan),
                 suggested_lr_min_div10=np.float64(sg.min_loss_lr_div10 if sg else np.nan))

    def _plot(self, path: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (Agg: no display)
        from matplotlib.figure import Figure  # noqa: PLC0415

        lrs, sm, raw = np.array(self.recorded_lrs), np.array(self.smoothed), np.array(self.raw_losses)
        fig = Figure(figsize=(7.5, 4.5), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(lrs, raw, color="0.7", linewidth=0.8, label="loss")
        ax.plot(lrs, sm, color="C0", linewidth=1.8, label=f"smoothed loss (beta {self.settings.beta:g})")
        ax.set_xscale("log")
        sg = self.suggestion
        if sg is not None:
            i = self.recorded_lrs.index(sg.steepest_lr)
            ax.plot([sg.steepest_lr], [sm[i]], "o", color="C3", markersize=8,
                    label=f"steepest descent: {sg.steepest_lr:.2e}")
            ax.axvline(sg.min_loss_lr_div10, color="C2", linestyle="--", linewidth=1.2,
                       label=f"min-loss lr / 10: {sg.min_loss_lr_div10:.2e}")
        finite = sm[np.isfinite(sm)]
        if finite.size:
            lo, hi = float(finite.min()), float(min(finite.max(), self.settings.stop_factor * finite.min()))
            pad = 0.05 * max(hi - lo, 1e-6)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("training loss")
        ax.set_title("LR range test")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
