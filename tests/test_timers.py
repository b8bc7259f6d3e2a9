"""megatron/observability/timers.py: level gating, accumulation, the Megatron-style block."""
from __future__ import annotations

import re

import pytest

from megatron.observability.timers import Timers


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_levels_accumulate_and_block(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("megatron.observability.timers.time.perf_counter", clock)
    timers = Timers(log_level=1, sync=lambda: None)
    for _ in range(2):
        with timers("forward-backward", level=1):
            clock.t += 0.25
        with timers("batch-generator", level=2):  # above the level: not timed
            clock.t += 5.0
        with timers("save-checkpoint", level=0):
            clock.t += 1.0
    assert timers.elapsed("save-checkpoint") == pytest.approx(2.0)
    assert timers.elapsed("save-checkpoint") == 0.0  # reset by the read
    block, ms = timers.log_block(["forward-backward", "batch-generator"], normalizer=2)
    assert ms == {"forward-backward": pytest.approx(250.0)}
    assert re.search(r"^    forward-backward \.+: \(250\.00, 250\.00\)$", block, re.M)
    assert "batch-generator" not in block
    assert timers.log_block(["forward-backward"])[1] == {}  # reset after logging


def test_misuse_is_reported():
    timers = Timers(log_level=1, sync=lambda: None)
    t = timers.timers.setdefault("x", __import__("megatron.observability.timers", fromlist=["Timer"]).Timer("x", lambda: None))
    with pytest.raises(RuntimeError, match="stopped before"):
        t.stop()
    t.start()
    with pytest.raises(RuntimeError, match="started twice"):
        t.start()


@pytest.mark.parametrize("name", ["cuda", "xpu"])
def test_timers_synchronize_the_device_on_a_torch_without_torch_accelerator(monkeypatch, name):
    """torch.accelerator is torch >= 2.6; on an older torch (setup.py allows 2.2) the timers must still wait
    for the device's queued kernels, through torch.cuda / torch.xpu, or each timer would measure only the
    launches and the time would land in whichever later timer waits (faked devices: this torch has neither)."""
    from types import SimpleNamespace

    import torch

    from megatron.observability import timers

    synced = []
    monkeypatch.delattr(torch, "accelerator", raising=False)
    for kind in ("cuda", "xpu"):
        monkeypatch.setattr(torch, kind, SimpleNamespace(is_available=lambda kind=kind: kind == name,
                                                         synchronize=lambda kind=kind: synced.append(kind)),
                            raising=False)
    timers.accelerator_synchronize()
    assert synced == [name]
    t = Timers(log_level=1)
    with t("forward-backward", level=1):
        pass
    assert synced == [name] * 3  # on start and on stop
