"""Profilers hanging off the loop: `--profile pt|pt-full` (torch profiler, Chrome trace) and
DeepSpeed's flops profiler at `--flops-profiler-step` (configured through the DeepSpeed config).

    # no-op unless --profile and this rank is in --profile-ranks
    profiler = Profiler.create(config.logging, config.runtime)
    for iteration in ...:
        profiler.step(iteration)          # before the iteration runs
        train_step(...)
    profiler.close()

The torch profiler records iterations first..last of `--profile_steps` (inclusive) and writes
`<trace-dir>/trace-rank<r>-iters<first>-<last>.json` (open it in chrome://tracing or Perfetto).
`pt` records CPU and accelerator activity; `pt-full` adds shapes, memory and Python stacks.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from megatron.config import LoggingConfig, RuntimeConfig

log = logging.getLogger(__name__)


def profile_range(spec: str) -> tuple[int, int]:
    first, last = (int(x) for x in spec.replace(" ", "").split(","))
    return first, last


@dataclass
class Profiler:
    mode: str | None = None
    first: int = 0
    last: int = -1
    trace_dir: str = "./trace/"
    rank: int = 0
    prof: object = None
    path: str | None = None

    @classmethod
    def create(cls, logging_config: LoggingConfig, runtime: RuntimeConfig) -> "Profiler":
        mode = logging_config.profile
        if mode is None or runtime.rank not in logging_config.profile_ranks:
            return cls()
        first, last = profile_range(logging_config.profile_steps)
        return cls(mode, first, last, logging_config.trace_dir, runtime.rank)

    def step(self, iteration: int) -> None:
        """Call with the number of the iteration about to run (1-based)."""
        if self.mode is None:
            return
        if iteration == self.first and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            for name in ("CUDA", "XPU"):
                dev = getattr(torch, name.lower(), None)
                if dev is not None and dev.is_available() and hasattr(torch.profiler.ProfilerActivity, name):
                    activities.append(getattr(torch.profiler.ProfilerActivity, name))
            full = self.mode == "pt-full"
            self.prof = torch.profiler.profile(activities=activities, record_shapes=full, profile_memory=full,
                                               with_stack=full)
            self.prof.__enter__()
        elif iteration == self.last + 1 and self.prof is not None:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        self.prof.__exit__(None, None, None)
        os.makedirs(self.trace_dir, exist_ok=True)
        self.path = os.path.join(self.trace_dir, f"trace-rank{self.rank}-iters{self.first}-{self.last}.json")
        self.prof.export_chrome_trace(self.path)
        self.prof = None
        print(f"> torch profiler ({self.mode}): iterations {self.first}-{self.last} -> {self.path}", flush=True)

