"""`bench/mup_lr_shift.py` at a reduced size (widths 32 and 64, 3 LRs, 15 steps, seconds): its tables
and final line parse and agree with its JSON, the optima follow from the printed losses, and at the
base width the MuP model is exactly the SP model (the bench sets the attention alpha for that), while
at the wider width the two differ. The optimum rule is checked against hand-computed values."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bench.mup_lr_shift import optimum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_optimum_refines_by_a_parabola_in_log2_lr():
    lrs = [2.0 ** -3, 2.0 ** -2, 2.0 ** -1]
    # y = (x + 2.3)^2 at x = -3, -2, -1: 0.49, 0.09, 1.69 -> vertex x = -2.3, lr = 2^-2.3 = 0.2030631
    assert optimum(lrs, [0.49, 0.09, 1.69]) == (pytest.approx(0.2030631, rel=1e-6), False)
    # best at the edge: not refined, flagged
    assert optimum(lrs, [1.0, 2.0, 3.0]) == (0.125, True)
    assert optimum(lrs, [3.0, 2.0, 1.0]) == (0.5, True)
    # a diverged neighbour (nan) is not used for the parabola
    assert optimum(lrs, [2.0, 1.0, float("nan")]) == (0.25, False)
    assert math.isnan(optimum(lrs, [float("nan")] * 3)[0])
    # uneven spacing: y = (x - 1)^2 at x = 0, 2, 3 (lr 1, 4, 8): 1, 1, 4 -> best grid point x = 0 is the edge
    assert optimum([1.0, 4.0, 8.0], [1.0, 1.0, 4.0]) == (1.0, True)
    # y = (x - 1.5)^2 at x = 0, 1, 3 (lr 1, 2, 8): 2.25, 0.25, 2.25 -> vertex 1.5
    assert optimum([1.0, 2.0, 8.0], [2.25, 0.25, 2.25])[0] == pytest.approx(2 ** 1.5, rel=1e-9)


@pytest.mark.slow
def test_reduced_bench_output(tmp_path):
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "mup_lr_shift.py"), "--widths", "32", "64",
                           "--lrs", "0.003", "0.01", "0.03", "--steps", "15", "--seq", "32", "--batch", "4",
                           "--val-batches", "2", "--vocab-size", "512", "--jobs", "1",
                           "--data-dir", str(tmp_path / "demo"), "--json", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    res = json.loads(out.read_text())
    assert res["widths"] == [32, 64] and res["lrs"] == [0.003, 0.01, 0.03] and len(res["runs"]) == 12

    # the loss table: one row per LR, columns SP w=32, SP w=64, MuP w=32, MuP w=64
    header = re.search(r"^\| LR +\| (.+) \|$", text, re.MULTILINE)
    assert header and [c.strip() for c in header.group(1).split("|")] == ["SP w=32", "SP w=64", "MuP w=32", "MuP w=64"]
    table = {}
    for lr in res["lrs"]:
        m = re.search(rf"^\| {lr:.3g} +\| (.+) \|$", text, re.MULTILINE)
        assert m, text
        table[lr] = [float(c) for c in m.group(1).split("|")]
    runs = {(r["parametrization"], r["width"], r["lr"]): r for r in res["runs"]}
    for lr, row in table.items():
        assert row == pytest.approx([runs[(p, w, lr)]["val_loss"] for p in ("SP", "MuP") for w in (32, 64)], abs=1e-4)
        assert all(0 < x < 2 * math.log(512) for x in row)  # finite and in the range of a 512-token LM
        # base width: MuP is the SP model, to the last bit; the wider width differs
        assert runs[("MuP", 32, lr)]["val_loss"] == runs[("SP", 32, lr)]["val_loss"]
        assert runs[("MuP", 32, lr)]["train_loss"] == runs[("SP", 32, lr)]["train_loss"]
        assert abs(runs[("MuP", 64, lr)]["val_loss"] - runs[("SP", 64, lr)]["val_loss"]) > 1e-4

    # optima follow from the losses; the final line is the log2 ratio of the wide and base optima
    log2_lrs = np.log2(res["lrs"])
    for par in ("SP", "MuP"):
        s = res["summary"][par]
        for w in (32, 64):
            losses = [runs[(par, w, lr)]["val_loss"] for lr in res["lrs"]]
            i = int(np.argmin(losses))
            if i == 1:  # interior: numpy's quadratic fit through the three points
                a, b, _ = np.polyfit(log2_lrs, losses, 2)
                want = 2 ** float(np.clip(-b / (2 * a), log2_lrs[0], log2_lrs[2])) if a > 0 else res["lrs"][1]
            else:
                want = res["lrs"][i]
            assert s["optimum"][str(w)] == pytest.approx(want, rel=1e-6), (par, w, losses)
        assert s["shift_log2"] == pytest.approx(math.log2(s["optimum"]["64"] / s["optimum"]["32"]), abs=1e-9)
    m = re.search(r"^optimum_shift_log2 sp=([+-]\d+\.\d\d) mup=([+-]\d+\.\d\d)$", text.splitlines()[-1])
    assert m, text.splitlines()[-1]
    assert float(m.group(1)) == pytest.approx(res["summary"]["SP"]["shift_log2"], abs=0.006)
    assert float(m.group(2)) == pytest.approx(res["summary"]["MuP"]["shift_log2"], abs=0.006)
    assert res["summary"]["SP"]["optimum"]["32"] == res["summary"]["MuP"]["optimum"]["32"]
