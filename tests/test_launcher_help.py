"""`bash train_alcf.sh --help`: usage and every environment variable the launcher reads, with defaults."""
from __future__ import annotations

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Read by the launcher but set by the system / job scheduler / Python environment, not by users.
SYSTEM = {"CONDA_PREFIX", "VIRTUAL_ENV", "PYTHON", "PBS_O_HOST", "PBS_O_WORKDIR", "SLURM_GPUS_ON_NODE", "SLURM_JOB_ID",
          "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_SUBMIT_DIR", "MACHINE", "ORIG_PWD", "VAR", "HOME", "PATH"}


def help_text(tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(ROOT, "train_alcf.sh"), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})


def variables_read_by_the_launcher() -> set[str]:
    with open(os.path.join(ROOT, "ALCF", "helpers.sh")) as f:
        src = f.read()
    names = set(re.findall(r"\$\{([A-Z][A-Z_0-9]*):-", src))  # ${NAME:-default}
    names |= set(re.findall(r"_alcf_default ([A-Z][A-Z_0-9]*)", src))
    for a, b in re.findall(r"_alcf_alias ([A-Z][A-Z_0-9]*) ([A-Z][A-Z_0-9]*)", src):
        names |= {a, b}
    return names - SYSTEM


def test_help_lists_every_variable_and_starts_nothing(tmp_path):
    proc = help_text(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("Usage: ") and "DRY_RUN=1 bash train_alcf.sh" in out
    listed = set(re.findall(r"\b[A-Z][A-Z_0-9]+\b", out))
    missing = sorted(variables_read_by_the_launcher() - listed)
    assert not missing, f"read by ALCF/helpers.sh but missing from --help (the Variables block): {missing}"
    assert os.listdir(tmp_path) == []  # no logs, checkpoints or venv


def test_help_shows_defaults(tmp_path):
    out = help_text(tmp_path).stdout
    for fragment in ("LR [0.0002]", "ZERO_STAGE [1]", "LR_WARMUP_FRAC|LR_WARMUP_FRACTION [0.05]", "EVAL_ITERS [20]",
                     "ADAM_BETA2 [0.95]", "OPT|OPTIMIZER|OPTIM [adamw]", "DEPTH_ALPHA [1.0]"):
        assert fragment in out, fragment
    short = subprocess.run(["bash", os.path.join(ROOT, "train_alcf.sh"), "-h"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=30)
    assert short.returncode == 0 and short.stdout == out
