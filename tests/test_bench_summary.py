"""bench/run.sh's summary table (bench/targets.py): final-line parsing, each status against its
target, and run.sh's exit status, with hand-made final lines (no benchmark runs: seconds)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from bench import targets
from bench.targets import parse_final_line, rows_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def status(rows, metric_part: str) -> tuple[str, str]:
    (row,) = [r for r in rows if metric_part in r.metric]
    return row.measured, row.status


def test_parse_final_line():
    log = ("| fp32 | 938 | 872 |\nratio fp32=0.5\n"
           "ratio fp32=1.032 bf16=1.401 mfu_fp32=0.1341 mfu_bf16=0.0126\n"
           "[2026-12-04 19:00:00,000] [INFO] [engine.py:1] shut down x=1\n\n")
    # the last key=value line wins; a DeepSpeed log line after it (several leading words) is not one
    assert parse_final_line(log) == {"fp32": 1.032, "bf16": 1.401, "mfu_fp32": 0.1341, "mfu_bf16": 0.0126}
    assert parse_final_line("first_step_seconds=18.98\n") == {"first_step_seconds": 18.98}  # no leading word
    assert parse_final_line("ratio max=1.83 zero3/zero0=0.76") == {"max": 1.83, "zero3/zero0": 0.76}
    got = parse_final_line("ratio save=abc load=0.9")
    assert math.isnan(got["save"]) and got["load"] == 0.9
    assert parse_final_line("ratio ours / raw encode throughput: 1.03\n") == {}  # the old, unparseable form
    assert parse_final_line("") == {}


def test_statuses_against_targets():
    rows = rows_for("train_throughput", "0", "ratio fp32=1.000 bf16=1.2 mfu_fp32=0.83 mfu_bf16=0.7512")
    assert status(rows, "fp32 ours/hf") == ("1.000", "ok")  # >= 1.0 at the boundary
    assert status(rows, "bf16 ours/hf") == ("1.200", "BELOW")  # target 1.5
    assert status(rows, "fp32 MFU") == ("83.0 %", "report")
    assert status(rows, "bf16 MFU") == ("75.1 %", "ok")  # target 75 %
    rows = rows_for("startup", "0", "first_step_seconds=20.5")
    assert status(rows, "first step") == ("20.50 s", "ABOVE")  # target <= 20 s
    rows = rows_for("data_index", "0", "ratio ours/mcore=0.985 cpu_ours/mcore=0.9 warm_seconds=2.63")
    assert [r.status for r in rows] == ["ok", "ok"]
    rows = rows_for("memory", "0", "ratio max=1.83 zero3/zero0=0.55 fp32grad_max=1.3 fp32grad_zero3/zero0=0.7")
    assert [r.status for r in rows] == ["ABOVE", "ok", "report", "report"]
    rows = rows_for("scaling", "0", "efficiency zero1=0.98 zero2=0.96 zero3=9.4")
    assert [r.status for r in rows] == ["ok", "BELOW", "SUSPECT (> 1.2: load)"]


def test_missing_failed_and_skipped():
    rows = rows_for("checkpoint_io", "0", "ratio save=0.9\n")  # no load= value
    assert status(rows, "save") == ("0.900", "ok")
    assert status(rows, "load") == ("-", "FAILED (no value)")
    rows = rows_for("checkpoint_io", "0", "Traceback (most recent call last):\n  ...\nKeyError: 'x'\n")
    assert {r.status for r in rows} == {"FAILED (no value)"}
    rows = rows_for("zero_tax", "0", "ratio fp32=nan bf16=0.99 cpu_fp32=0.97 cpu_bf16=0.98")
    assert [r.status for r in rows] == ["FAILED (no value)", "ok", "report", "report"]
    rows = rows_for("zero_tax", "1", "ratio fp32=0.99 bf16=0.99 cpu_fp32=0.99 cpu_bf16=0.99")  # the bench exited 1
    assert [(r.measured, r.status) for r in rows] == [("0.990", "FAILED (exit 1)")] * 4
    rows = rows_for("memory", "skip:MEMORY=1 runs it")
    assert {r.status for r in rows} == {"not run (MEMORY=1 runs it)"} and len(rows) == 4
    assert rows_for("no_such_bench", "0", "x=1")[0].status.startswith("FAILED (no targets")


def test_every_run_of_run_sh_has_targets():
    with open(os.path.join(ROOT, "bench", "run.sh")) as f:
        names = set(re.findall(r'^\s+"(\w+)\|(\w+)\|', f.read(), re.M))
    assert names, "run.sh's bench list format changed"
    runs = {t.run for t in targets.TARGETS}
    for name, script in names:
        assert name in runs, name
        assert os.path.isfile(os.path.join(ROOT, "bench", script + ".py")), script


FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for every benchmark; bench/targets.py runs for real
case "$(basename "$1")" in
  targets.py) exec "$REAL_PYTHON" "$@" ;;
  train_throughput.py) echo "ratio fp32=1.100 bf16=1.600 mfu_fp32=0.8 mfu_bf16=0.7" ;;
  zero_tax.py) echo "ratio fp32=0.990 bf16=0.990 as_is_fp32=0.9 as_is_bf16=0.9 cpu_fp32=0.99 cpu_bf16=0.99" ;;
  scaling.py) echo "efficiency zero1=0.980 zero2=0.980 zero3=0.950" ;;
  checkpoint_io.py) echo "ratio save=0.900 load=0.900" ;;
  startup.py) echo "[2026] [INFO] launching"; echo "Traceback: boom" >&2; exit 3 ;;
  data_index.py) echo "ratio ours/mcore=0.900 cpu_ours/mcore=0.9 warm_seconds=1.5" ;;
  preprocess.py) echo "ratio ours/raw=1.000" ;;
  memory.py) [[ "$2 $3" == "--configs z0,z3" ]] || exit 7; echo "ratio max=1.20 zero3/zero0=0.50 fp32grad_max=1.1 fp32grad_zero3/zero0=0.6" ;;
  *) echo "unexpected $*" >&2; exit 9 ;;
esac
"""


def test_run_sh_table_and_exit_status(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "QUICK": "1", "BENCH_OUT": str(out),
           "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("MEMORY", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "run.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # startup failed: non-zero, after the table
    table = proc.stdout.split("=== summary", 1)[1]
    rows = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")[1:]] for ln in table.splitlines() if "|" in ln}
    assert rows["startup launch -> first step"] == ["-", "<= 20.00 s", "FAILED (exit 3)"]
    assert rows["train_throughput bf16 MFU"] == ["70.0 %", ">= 75.0 %", "BELOW"]
    assert rows["scaling 2-rank efficiency ZeRO-3"] == ["0.950", ">= 0.930", "ok"]
    assert rows["--compile bf16 MFU"][2].startswith("not run (QUICK")
    assert rows["memory peak / ZeRO formula, worst cell"][2] == "not run (MEMORY=1 runs it)"
    assert [r[2] for k, r in rows.items() if k.startswith(("zero_tax", "checkpoint", "data_index", "preprocess"))] \
        == ["ok"] * 2 + ["report"] * 2 + ["ok"] * 5
    assert "[2026] [INFO]" not in proc.stdout and "[2026] [INFO]" in (out / "startup.txt").read_text()
    assert "Traceback: boom" in (out / "startup.txt").read_text()  # stderr kept in the log

    # every bench passing, memory.py too (QUICK: ZeRO-0 and -3 only): exit 0
    fake.write_text(FAKE_PYTHON.replace('echo "[2026] [INFO] launching"; echo "Traceback: boom" >&2; exit 3',
                                        'echo "first_step_seconds=6.0"'))
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "run.sh")], env={**env, "MEMORY": "1"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout and "not run (MEMORY" not in proc.stdout
    assert re.search(r"memory ZeRO-3 / ZeRO-0 model states +\| +0\.500 \| <= 0\.600 +\| ok", proc.stdout)


def test_targets_cli_usage(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "targets.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "manifest.tsv" in proc.stderr


@pytest.mark.parametrize("op,value,x,expected", [(">=", 0.8, 0.79, "BELOW"), ("<=", 1.0, 1.01, "ABOVE"),
                                                  (">=", 0.8, 0.8, "ok"), ("<=", 1.0, 1.0, "ok")])
def test_judge(op, value, x, expected):
    assert targets.Target("r", "k", "m", op, value).judge(x) == expected
