"""Named wall-clock timers for the training loop (Megatron's `--timing-log-level` semantics).

    timers = Timers(log_level=1, log_option="minmax")
    with timers("forward-backward", level=1):
        ...
    print(timers.log_block(["forward-backward", "optimizer"], normalizer=iters))

A timer whose level is above `--timing-log-level` is a no-op (no device synchronization, no
cost). Level 0 timers are always on (the loop uses them to keep evaluation and checkpoint
time out of the throughput numbers). Active timers synchronize the accelerator when they
start and stop, so asynchronous kernels are charged to the right timer; on a CPU that is free.
The log block gathers every rank's times (a collective: all ranks must call it together).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron.core.parallel_state import collective_device


def accelerator_synchronize() -> None:
    """Wait for the kernels queued on the accelerator: torch.accelerator, or where torch is older than 2.6
    (the CUDA and XPU frameworks modules of 2024) the device's own module."""
    acc = getattr(torch, "accelerator", None)
    try:
        if acc is None:
            for name in ("cuda", "xpu"):
                mod = getattr(torch, name, None)
                if mod is not None and mod.is_available():
                    mod.synchronize()
                    return
        elif acc.current_accelerator() is not None:
            acc.synchronize()
    except RuntimeError:
        pass


@dataclass
class Timer:
    name: str
    sync: Callable[[], None]
    total: float = 0.0
    started: float | None = None

    def start(self) -> None:
        if self.started is not None:
            raise RuntimeError(f"timer {self.name} started twice")
        self.sync()
        self.started = time.perf_counter()

    def stop(self) -> None:
        if self.started is None:
            raise RuntimeError(f"timer {self.name} stopped before it was started")
        self.sync()
        self.total += time.perf_counter() - self.started
        self.started = None

    def elapsed(self, reset: bool = True) -> float:
        """Accumulated seconds (of finished start/stop pairs)."""
        t = self.total
        if reset:
            self.total = 0.0
        return t


@dataclass
class Timers:
    """A set of named timers; `log_level` = `--timing-log-level`, `log_option` = min/max/all."""
    log_level: int = 0
    log_option: str = "minmax"
    sync: Callable[[], None] = accelerator_synchronize
    timers: dict[str, Timer] = field(default_factory=dict)

    def active(self, level: int) -> bool:
        return level <= self.log_level

    @contextmanager
    def __call__(self, name: str, level: int = 1) -> Iterator[None]:
        if not self.active(level):
            yield
            return
        timer = self.timers.setdefault(name, Timer(name, self.sync))
        timer.start()
        try:
            yield
        finally:
            timer.stop()

    def elapsed(self, name: str, reset: bool = True) -> float:
        """Seconds accumulated by `name` on this rank (0 if it never ran)."""
        t = self.timers.get(name)
        return t.elapsed(reset) if t else 0.0

    def gather(self, names: list[str], reset: bool = True) -> dict[str, list[float]]:
        """{name: [seconds on rank 0, rank 1, ...]} for the timers that ran on some rank."""
        local = torch.tensor([self.elapsed(n, reset) for n in names], dtype=torch.float64,
                             device=collective_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            table = torch.stack(parts).cpu()
        else:
            table = local.unsqueeze(0)
        return {n: table[:, i].tolist() for i, n in enumerate(names) if table[:, i].abs().sum() > 0}

    def log_block(self, names: list[str], normalizer: float = 1.0, reset: bool = True) -> tuple[str, dict]:
        """The Megatron-style timers block (ms per iteration) and {name: max ms} for the metrics."""
        per_rank = self.gather(names, reset)
        if not per_rank:
            return "", {}
        scale = 1000.0 / max(normalizer, 1e-12)
        if self.log_option == "max":
            lines = ["max time across ranks (ms):"]
        elif self.log_option == "all":
            lines = ["times across ranks (ms):"]
        else:
            lines = ["(min, max) time across ranks (ms):"]
        maxima = {}
        for name, values in per_rank.items():
            ms = [v * scale for v in values]
            maxima[name] = max(ms)
            label = f"    {name} ".ljust(48, ".")
            if self.log_option == "max":
                lines.append(f"{label}: {max(ms):.2f}")
            elif self.log_option == "all":
                lines.append(f"{label}: " + ", ".join(f"{v:.2f}" for v in ms))
            else:
                lines.append(f"{label}: ({min(ms):.2f}, {max(ms):.2f})")
        return "\n".join(lines), maxima
