"""The launcher at the production defaults (issue: every combination the launcher can produce is exact or
refused): `NPROC=2 DTYPE=bf16 ZERO_STAGE=1 OPT=<name> bash train_alcf.sh` on the demo data, for the
optimizers whose math needed whole tensors under ZeRO (muon, lamb, sophiag, adamwschedulefree). Each trains
10 steps with a falling loss, saves, and a second launch resumes the checkpoint (global_step10, 2 ranks,
real ZeRO-1 partitions) and trains on from iteration 11 with the counters carried over."""
from __future__ import annotations

import glob
import os

import pytest
from test_end_to_end import assert_clean, run_launcher

pytestmark = pytest.mark.slow

OPTS = {"muon": "0.02", "lamb": "0.02", "sophiag": "0.002", "adamwschedulefree": "0.01"}


@pytest.fixture(scope="module")
def demo_list(demo_data) -> str:
    return demo_data  # the session's (conftest.py)


def metrics(ckpt: str) -> dict[int, dict]:
    import json

    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if "lm_loss" in r}


@pytest.mark.parametrize("opt", sorted(OPTS))
def test_defaults_train_and_resume(opt, demo_list, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    env = {"DATA_FILE_LIST": demo_list, "MODEL_ARCH": "tiny", "NPROC": "2", "DTYPE": "bf16", "ZERO_STAGE": "1",
           "OPT": opt, "LR": OPTS[opt], "LR_WARMUP_FRACTION": "0.1", "MICRO_BATCH": "2", "GRAD_ACC_STEPS": "2",
           "TRAIN_ITERS": "10", "CKPT_DIR": ckpt}
    proc = run_launcher(tmp_path, env, "--log-interval", "1", "--eval-iters", "0")
    assert_clean(proc)
    out = proc.stdout + proc.stderr
    assert "bf16" in out and "ZeRO stage" in out
    first = metrics(ckpt)
    assert sorted(first) == list(range(1, 11))
    losses = [first[i]["lm_loss"] for i in range(1, 11)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # falling
    assert glob.glob(os.path.join(ckpt, "global_step10", "*optim_states.pt"))  # real ZeRO-1 shards
    # the first launch ran the trainer's --check-args on the same settings already
    proc = run_launcher(tmp_path, {**env, "TRAIN_ITERS": "12", "CHECK_ARGS": "0"}, "--log-interval", "1",
                        "--eval-iters", "0")
    assert_clean(proc)
    resumed = metrics(ckpt)
    assert sorted(resumed) == list(range(1, 13))  # a resumed run appends
    assert resumed[11]["consumed_samples"] == first[10]["consumed_samples"] + 8  # 2 ranks x 2 micro x 2 acc
    assert resumed[12]["lm_loss"] < losses[0]
