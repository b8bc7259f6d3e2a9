"""tools/plot_run.py: metrics.jsonl -> loss / LR / throughput PNGs."""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest

from tools.plot_run import per_iteration_losses, read_metrics, running_mean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_metrics(path: str, iters: int = 40, log: int = 4) -> None:
    with open(path, "w") as f:
        for it in range(log, iters + 1, log):
            losses = [8.0 * math.exp(-i / 15) + 2.0 for i in range(it - log + 1, it + 1)]
            f.write(json.dumps({"iteration": it, "lm_loss": sum(losses) / log, "losses": losses,
                                "lr": 1e-3 * min(1.0, it / 8), "consumed_tokens": it * 4096,
                                "tokens_per_gpu_per_sec": 1000.0 + it, "mfu": 0.3}) + "\n")
            if it % 20 == 0:
                f.write(json.dumps({"iteration": it, "val_loss": losses[-1] + 0.1, "val_ppl": 1.0}) + "\n")
        f.write(json.dumps({"summary": {"tokens": "1"}}) + "\n")


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_cli_writes_three_valid_pngs(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(str(metrics))
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_run.py"), str(metrics),
                           "--output-dir", str(out), "--tokens"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.path.basename(p) for p in proc.stdout.split())
    assert names == ["loss.png", "lr.png", "throughput.png"]
    for name in names:
        path = out / name
        assert path.stat().st_size > 10_000  # a drawn figure, not an empty canvas
        assert png_size(str(path)) == (960, 540)  # 8 x 4.5 inches at 120 dpi


def test_reading_expands_intervals_and_later_records_win(tmp_path):
    metrics = tmp_path / "m.jsonl"
    write_metrics(str(metrics), iters=8, log=4)
    with open(metrics, "a") as f:  # a resumed run re-logs iteration 8
        f.write(json.dumps({"iteration": 8, "lm_loss": 1.0, "losses": [1.0, 1.0, 1.0, 1.0], "lr": 0.0,
                            "consumed_tokens": 8 * 4096}) + "\n")
    train, val = read_metrics(str(metrics))
    its, losses = per_iteration_losses(train)
    assert its == list(range(1, 9)) and losses[4:] == [1.0] * 4 and val == {}
    assert running_mean([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_errors_are_one_line(tmp_path):
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_run.py"), str(tmp_path / "no.jsonl")],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and missing.stderr.startswith("ERROR:") and "not found" in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(SystemExit, match="not JSON"):
        read_metrics(str(bad))
