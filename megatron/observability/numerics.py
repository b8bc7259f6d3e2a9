"""Numerical faults in the training loop: NaN/Inf loss or gradients skip the optimizer step.

With fp32/bf16 DeepSpeed has no loss scaler, so nothing would stop a NaN from reaching the
weights. `NumericsGuard.step` wraps `engine.step()` at the gradient-accumulation boundary: when
any micro-batch loss of the iteration (on any rank) or any local gradient is non-finite, the
optimizer update and the LR-scheduler step are suppressed (DeepSpeed still clears the gradients
and advances its micro-step bookkeeping), and the iteration is counted as skipped
(``engine.skipped_steps``, the log line's ``number_of_skipped_iterations``; the NaN loss itself is
counted in ``number_of_nan_iterations``). Steps DeepSpeed's ZeRO optimizer skips on its own (its
grad-overflow check) count as skipped too. As upstream Megatron, a skipped iteration consumes its
batch and does not advance the LR schedule.

fp16 (megatron/fp16.py): DeepSpeed's loss scaler owns the skip decision. Every step goes to
DeepSpeed, which skips a step whose gradients overflowed, lowers the loss scale, and does not
step the LR scheduler. The guard does not scan the gradients (an fp16 gradient overflow is the
scaler's normal working, e.g. while it comes down from its initial scale) and only classifies
the skip: a skipped iteration whose loss was finite on every rank is a gradient *overflow*
(counted in ``overflows``, the log line's number_of_skipped_iterations and metrics.jsonl's
skipped_iterations; it does not count toward --max-skipped-iterations, nor does it end a run of
faults); a skipped iteration with a non-finite loss is a numerical fault as in fp32/bf16. When the
gradients still overflow at the minimum loss scale, DeepSpeed's ZeRO scaler gives up; that is
reported as a `NumericalFaultError`.

``--max-skipped-iterations K``: after K skipped iterations in a row `end_iteration` returns True;
the loop saves a checkpoint (the weights are those of the last good step) and raises
`NumericalFaultError`. ``--loss-spike-factor F``: a loss above F x its running mean is logged.

Test hook (used only by tests): ``MEGATRON_TEST_FAULTS="nan@3,inf@5,spike@7,drop@4"`` multiplies
the loss of every micro-batch of that iteration by NaN / Inf / 100, or (``drop``) discards that
iteration's batches before it starts, so iteration k trains on batch k+1 (a run "whose batch k
was dropped"). Process and storage faults: ``kill@k`` / ``stop@k`` send the process SIGKILL /
SIGSTOP (a dead / hung rank) in iteration k's forward; ``overflow@k`` multiplies the loss by 1e30:
finite in float32, but under fp16 its gradients overflow (a forced loss-scaler overflow);
``enospc@k`` makes the checkpoint save of iteration k fail with "No space left on device"
(megatron/checkpoint/io.py). ``kind@k:r`` limits an entry to rank r.
"""
from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron.config import Config
from megatron.core.parallel_state import all_reduce_values
from megatron.deepspeed_compat.engine import step_without_update

log = logging.getLogger(__name__)

FAULTS_ENV = "MEGATRON_TEST_FAULTS"
_FACTORS = {"nan": float("nan"), "inf": float("inf"), "spike": 100.0, "overflow": 1e30}
_SIGNALS = {"kill": "SIGKILL", "stop": "SIGSTOP"}
_KINDS = (*_FACTORS, *_SIGNALS, "drop", "enospc")


class NumericalFaultError(RuntimeError):
    """Too many iterations in a row had a non-finite loss or gradient."""


def parse_faults(spec: str, rank: int | None = None) -> dict[int, str]:
    """{iteration: kind} from ``"nan@3,inf@5,kill@4:1"`` (kinds: nan, inf, spike, overflow, drop, kill,
    stop, enospc; ``:r`` = on rank r only, dropped here when `rank` is another one)."""
    out: dict[int, str] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        kind, _, where = item.partition("@")
        it, _, on_rank = where.partition(":")
        if kind not in _KINDS or not it.isdigit() or (on_rank and not on_rank.isdigit()):
            raise ValueError(f"{FAULTS_ENV}: bad entry {item!r} (expected kind@iteration[:rank], kind in "
                             f"{'|'.join(_KINDS)})")
        if not on_rank or rank is None or int(on_rank) == rank:
            out[int(it)] = kind
    return out


def injected_fault(iteration: int, rank: int = 0) -> str | None:
    """The MEGATRON_TEST_FAULTS kind for this iteration and rank (None almost always)."""
    spec = os.environ.get(FAULTS_ENV, "")
    return parse_faults(spec, rank).get(iteration) if spec else None


def local_grads_finite(module: torch.nn.Module) -> bool:
    """False if a gradient still held by a parameter (ZeRO-0, or before ZeRO's reduction) is non-finite."""
    flags = [torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


@dataclass
class NumericsGuard:
    max_skipped: int | None = None
    spike_factor: float = 5.0
    faults: dict[int, str] = field(default_factory=dict)
    fp16: bool = False  # DeepSpeed's loss scaler decides the skips (see the module)
    skipped_in_a_row: int = 0
    overflows: int = 0  # fp16 steps skipped on a gradient overflow with a finite loss
    skipped_total: int = 0
    mean: float | None = None  # running mean of finite losses (for spike detection)
    finite_seen: int = 0
    _iteration_losses: list = field(default_factory=list)
    _last_skipped: bool = False
    _last_overflow: bool = False

    @classmethod
    def create(cls, config: Config) -> "NumericsGuard":
        training = config.training
        return cls(max_skipped=training.max_skipped_iterations,
                   spike_factor=float(training.loss_spike_factor or 0.0),
                   faults=parse_faults(os.environ.get(FAULTS_ENV, ""), int(config.runtime.rank or 0)),
                   fp16=bool(config.precision.fp16))

    # ------------------------------------------------------------------ test hooks
    def wrap_data(self, data_iter: Iterator, start_iteration: int, micro_batches: int) -> Iterator:
        """The data iterator, minus the batches of the iterations marked ``drop``."""
        if "drop" not in self.faults.values():
            return data_iter

        def gen():
            n = 0
            while True:
                if n % micro_batches == 0 and self.faults.get(start_iteration + n // micro_batches + 1) == "drop":
                    for _ in range(micro_batches):
                        next(data_iter)
                yield next(data_iter)
                n += 1
        return gen()

    def inject(self, iteration: int, loss: torch.Tensor) -> torch.Tensor:
        kind = self.faults.get(iteration)
        if kind in _SIGNALS:  # a rank dying (SIGKILL) or hanging (SIGSTOP) mid-iteration
            log.error("%s: sending myself %s in iteration %d", FAULTS_ENV, _SIGNALS[kind], iteration)
            os.kill(os.getpid(), getattr(signal, _SIGNALS[kind]))
        return loss * _FACTORS[kind] if kind in _FACTORS else loss

    # ------------------------------------------------------------------ the step
    def step(self, engine, loss: torch.Tensor, step_fn: Callable[[], None]) -> None:
        """Called instead of `engine.step()` after each micro-batch's backward."""
        self._iteration_losses.append(loss.detach())
        if not engine.is_gradient_accumulation_boundary():
            step_fn()
            return
        finite = bool(torch.isfinite(torch.stack(self._iteration_losses)).all())
        finite = finite and (self.fp16 or local_grads_finite(engine.module))  # fp16: DeepSpeed checks the grads
        self._iteration_losses = []
        if dist.is_initialized():  # every rank skips, or none does
            finite = not all_reduce_values([0.0 if finite else 1.0], op=dist.ReduceOp.MAX)[0]
        before = int(getattr(engine, "skipped_steps", 0))
        if finite or self.fp16:
            if self.fp16:
                self._fp16_step(step_fn)
            else:
                step_fn()
            self._last_skipped = int(getattr(engine, "skipped_steps", 0)) > before  # DeepSpeed's own overflow skip
            self._last_overflow = self.fp16 and self._last_skipped and finite
            return
        step_without_update(engine, step_fn)  # DeepSpeed clears the gradients and counts the step
        self._last_skipped = True

    @staticmethod
    def _fp16_step(step_fn: Callable[[], None]) -> None:
        """DeepSpeed's step; its ZeRO loss scaler raises a bare Exception when the gradients overflow
        at the minimum scale: that is this module's fault, with the fix."""
        try:
            step_fn()
        except Exception as e:
            if "loss scale already at minimum" not in str(e):
                raise
            raise NumericalFaultError(
                "fp16: the gradients overflow even at the minimum loss scale (--min-loss-scale); lower --lr, "
                "check the data, lower --min-loss-scale, or train in bf16 (DTYPE=bf16)") from None

    def end_iteration(self, iteration: int, loss: float, rank: int = 0) -> bool:
        """Count skips and watch for spikes; True when --max-skipped-iterations is reached."""
        if self._last_overflow:  # fp16: the loss scaler's own skip, not a numerical fault
            self.overflows += 1
            if rank == 0:
                log.info("iteration %d: fp16 gradient overflow, step skipped by DeepSpeed's loss scaler "
                         "(%d overflows so far)", iteration, self.overflows)
        elif self._last_skipped:
            self.skipped_in_a_row += 1
            self.skipped_total += 1
            if rank == 0:
                log.warning("iteration %d skipped: non-finite loss or gradient (loss=%s; %d in a row, %d in total)",
                            iteration, loss, self.skipped_in_a_row, self.skipped_total)
        else:
            self.skipped_in_a_row = 0
            if math.isfinite(loss):
                if (self.spike_factor and self.mean is not None and self.finite_seen >= 5
                        and loss > self.spike_factor * self.mean and rank == 0):
                    log.warning("loss spike at iteration %d: %.4f > %.1f x running mean %.4f",
                                iteration, loss, self.spike_factor, self.mean)
                self.finite_seen += 1
                self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss
        self._last_skipped = self._last_overflow = False
        return bool(self.max_skipped and self.skipped_in_a_row >= self.max_skipped)
