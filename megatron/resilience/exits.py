"""Conditions that end a run early and cleanly (a checkpoint is saved first): SIGTERM with
--exit-signal-handler, --exit-interval, --exit-duration-in-mins, --kill-switch-file."""
from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist

from megatron.config import TrainingConfig
from megatron.core.parallel_state import all_reduce_values


class ExitConditions:
    """SIGTERM (--exit-signal-handler), --exit-interval, --exit-duration-in-mins, --kill-switch-file."""

    def __init__(self, training: TrainingConfig):
        self.training, self.start, self.signalled = training, time.time(), False
        if training.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self.signalled = True

    def reason(self, iteration: int) -> str | None:
        a = self.training
        flags = [self.signalled,
                 bool(a.exit_interval and iteration % a.exit_interval == 0),
                 bool(a.exit_duration_in_mins and (time.time() - self.start) / 60 > a.exit_duration_in_mins),
                 bool(a.kill_switch_file and os.path.exists(a.kill_switch_file))]
        if dist.is_initialized():  # every rank must agree
            flags = [bool(x) for x in all_reduce_values([float(f) for f in flags], op=dist.ReduceOp.MAX)]
        names = ["signal", "exit-interval", "exit-duration", "kill-switch-file"]
        return next((n for n, f in zip(names, flags) if f), None)
