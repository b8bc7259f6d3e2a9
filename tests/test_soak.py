"""The reduced soak (tests/soak.py, same code as the nightly 2,000-step demo soak): the tiny model
trained 120 iterations, saving every 10, with a SIGTERM + resume after iterations 40 and 80, logs
exactly the losses of an uninterrupted run (every iteration, not only the last)."""
from __future__ import annotations

import os

import pytest
import soak

from megatron.checkpoint import checkpointing as ck


@pytest.mark.slow
def test_reduced_soak_matches_uninterrupted_run(tmp_path):
    r = soak.soak("tiny", steps=120, save_interval=10, sigterm_every=40, workdir=str(tmp_path), jobs=2,
                  timeout=900)
    assert [(s.signalled, s.start) for s in r.segments] == [(True, 0), (True, r.segments[0].stop),
                                                             (False, r.segments[1].stop)]
    assert 40 <= r.segments[0].stop < 80 <= r.segments[1].stop < 120 == r.segments[2].stop
    assert r.iterations_compared == 120
    assert r.iterations_differing == 0 and r.max_abs_diff == 0.0
    assert r.interrupted_final_loss == r.reference_final_loss < 6.0  # it learned (initial loss ~6.2)
    assert r.ok
    ckpt = os.path.join(str(tmp_path), "interrupted", "ckpt")
    assert ck.read_tag(ckpt) == "global_step120"
    assert len(ck.checkpoint_tags(ckpt)) <= 2  # --keep-last-n 2


def test_strip_flags():
    argv = ["--lr", "0.001", "--save=ck", "--train-iters", "400", "--exit-signal-handler", "--swiglu",
            "--deepspeed_config=ds.json", "--log-interval=10", "--seq-length=256"]
    assert soak._strip_flags(argv) == ["--lr", "0.001", "--swiglu", "--seq-length=256"]
