"""The user guide's LR commands, for real, on the demo data (Shakespeare) with the `tiny` preset:

* `LR_DECAY_STYLE=constant ... bash train_alcf.sh --lr_constant_plus_cooldown
  --lr_constant_plus_cooldown_frac 0.01` with the guide's values (LR=0.0002, LR_WARMUP_FRACTION=0.01,
  OPT=muon, TRAIN_TOKENS): the logged LR of every iteration equals the schedule worked out by hand;
* `TRAIN_ITERS=... bash train_alcf.sh ... --lr-finder` with the guide's flags: the finder's CSV, NPZ
  and PNG land in {save}/lr_finder/, a suggestion is printed, no checkpoint is written, and a short
  run at the suggested LR trains without diverging.

Only the sizes differ from the guide (the `tiny` preset, GRAD_ACC_STEPS=1, a few hundred steps), so
that the runs fit on a CPU.
"""
from __future__ import annotations

import csv
import glob
import math
import os
import re

import numpy as np
import pytest
from test_end_to_end import assert_clean, metrics_of, run_launcher

pytestmark = pytest.mark.slow

GUIDE_ENV = {"LR_DECAY_STYLE": "constant", "LR": "0.0002", "LR_WARMUP_FRACTION": "0.01", "OPT": "muon"}
SMALL = {"MODEL_ARCH": "tiny", "GRAD_ACC_STEPS": "1", "OMP_NUM_THREADS": "1", "EVAL_ITERS": "5",
         "EVAL_INTERVAL": "1000", "SAVE_INTERVAL": "1000"}
TINY_SEQ = 64  # the tiny preset's sequence length


def run_dir(workdir) -> str:
    (path,) = glob.glob(os.path.join(str(workdir), "checkpoints", "tiny-ws1-*"))
    return path


def test_constant_lr_with_final_1_minus_sqrt_cooldown(demo_data, tmp_path):
    """300 iterations of 1 sample (TRAIN_TOKENS = 300 x 64). With frac 0.01 the warmup is W = 3
    samples and the cooldown the last Cc = 3 samples; the LR logged at iteration i is the LR of
    sample count N = i (the next step's). By hand, max = 2e-4, min = 0 (no MIN_LR):
    warmup i <= 3: 2e-4 * i / 3; constant 2e-4 up to i = 297; cooldown r = (i - 297) / 3:
    i = 298: 2e-4 (1 - sqrt(1/3)) = 8.4529946e-05, i = 299: 2e-4 (1 - sqrt(2/3)) = 3.6700684e-05;
    i = 300 (end): min = 0."""
    proc = run_launcher(tmp_path, {"DATA_FILE_LIST": demo_data, "TRAIN_TOKENS": str(300 * TINY_SEQ),
                                   **GUIDE_ENV, **SMALL},
                        "--lr_constant_plus_cooldown", "--lr_constant_plus_cooldown_frac", "0.01")
    assert_clean(proc)
    train, val = metrics_of(tmp_path)
    assert sorted(train) == list(range(1, 301))
    assert train[300]["consumed_samples"] == 300 and train[300]["consumed_tokens"] == 300 * TINY_SEQ
    lr = {i: r["lr"] for i, r in train.items()}
    expected = {1: 6.6666667e-05, 2: 1.3333333e-04, 3: 2e-4, 298: 8.4529946e-05, 299: 3.6700684e-05, 300: 0.0}
    expected.update({i: 2e-4 for i in range(4, 298)})
    for i in range(1, 301):
        assert lr[i] == pytest.approx(expected[i], rel=1e-7, abs=1e-12), (i, lr[i])
    assert all(math.isfinite(r["lm_loss"]) for r in train.values())
    assert [v["iteration"] for v in val] == [300] and math.isfinite(val[0]["val_loss"])
    with open(os.path.join(run_dir(tmp_path), "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "300"


def _suggestions(stdout: str) -> tuple[float, float]:
    m = re.search(r"suggested LR \(steepest descent of the smoothed loss\) = ([0-9.e+-]+)", stdout)
    m10 = re.search(r"suggested LR \(min-loss LR / 10\) = ([0-9.e+-]+)", stdout)
    assert m and m10, stdout[-3000:]
    return float(m.group(1)), float(m10.group(1))


def test_lr_finder_then_train_at_the_suggestion(demo_data, tmp_path):
    init_std = f"{math.sqrt(2 / (5 * 64)):.10g}"  # the guide's ${sqrt(2/5d)} for the tiny preset's d = 64
    guide_args = ["--lr_constant_plus_cooldown", "--init-method-std", init_std, "--adjust-word-embedding-init",
                  "--word-embedding-init-std", "0.632"]
    finder_wd = tmp_path / "finder"
    finder_wd.mkdir()
    proc = run_launcher(finder_wd, {"DATA_FILE_LIST": demo_data, "TRAIN_ITERS": "60", "MICRO_BATCH": "4",
                                    **GUIDE_ENV, **SMALL}, *guide_args, "--lr-finder")
    assert_clean(proc)
    save = run_dir(finder_wd)
    out = os.path.join(save, "lr_finder")
    assert {"lr_finder_data.csv", "lr_finder_data.npz", "lr_finder.png"} <= set(os.listdir(out))
    # no checkpoint anywhere in the run directory
    for root, dirs, files in os.walk(save):
        assert not [d for d in dirs if d.startswith("global_step")], root
        assert not {"latest", "latest_checkpointed_iteration.txt"} & set(files), root
    with open(os.path.join(out, "lr_finder_data.csv")) as fh:
        rows = list(csv.DictReader(fh))
    lrs = np.array([float(r["learning_rate"]) for r in rows])
    assert 10 <= len(lrs) <= 60  # TRAIN_ITERS steps unless it stopped early
    assert lrs[0] == pytest.approx(1e-6)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], 1e6 ** (1 / 59), rtol=1e-9)  # 1e-6 -> 1.0 in 60 steps
    with open(os.path.join(out, "lr_finder.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    steep, div10 = _suggestions(proc.stdout)
    npz = np.load(os.path.join(out, "lr_finder_data.npz"))
    assert steep == pytest.approx(float(npz["suggested_lr_steepest"]), rel=1e-3)
    assert div10 == pytest.approx(float(npz["suggested_lr_min_div10"]), rel=1e-3)
    assert lrs[0] <= steep <= lrs[-1]

    # the same command without --lr-finder, at the smaller suggestion: the loss falls, nothing diverges
    lr = min(steep, div10)
    train_wd = tmp_path / "train"
    train_wd.mkdir()
    proc = run_launcher(train_wd, {"DATA_FILE_LIST": demo_data, "TRAIN_ITERS": "40", "MICRO_BATCH": "4",
                                   **GUIDE_ENV, **SMALL, "LR": f"{lr:.4g}"}, *guide_args)
    assert_clean(proc)
    train, val = metrics_of(train_wd)
    losses = [train[i]["lm_loss"] for i in range(1, 41)]
    assert all(math.isfinite(x) for x in losses) and all(r["nan_iterations"] == 0 for r in train.values())
    assert max(r["lr"] for r in train.values()) == pytest.approx(float(f"{lr:.4g}"))
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 1.0, losses
    # better than a uniform guess over the 8000-token demo vocabulary (ln 8000 = 8.99)
    assert val[-1]["iteration"] == 40 and val[-1]["val_loss"] < math.log(8000) - 1.0, val
