#!/usr/bin/env python
"""A separate venv with megatron-core, for cross-checks (tests, benchmarks).

megatron-core installs a namespace package ``megatron`` that clashes with ours, so it lives in
its own venv (default ``<repo>/.venv-mcore``, git-ignored), created on first use and reused afterwards:
megatron-core alone, with our torch, numpy and packaging on its path (a few seconds); where that does
not import, ``pip install torch==<our torch> megatron-core==0.16.1`` in it (~35 s wall, ~70 s of CPU).

    python tools/mcore_venv.py          # create (if needed) and print the venv's python
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MCORE_VERSION = "0.16.1"
TORCH_VERSION = "2.13.0"
_PROBE = "import megatron.core.datasets.helpers_cpp, megatron.core.datasets.indexed_dataset"


def venv_python(venv: str | None = None) -> str:
    venv = venv or os.environ.get("MCORE_VENV") or os.path.join(ROOT, ".venv-mcore")
    return os.path.join(venv, "bin", "python")


def isolated_env() -> dict:
    """The environment for the megatron-core venv's processes: without PYTHONPATH (our repo on it
    would shadow megatron-core's namespace package `megatron`) and without our venv's variables."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _works(python: str) -> bool:
    if not os.path.isfile(python):
        return False
    if _has_helpers(python):  # cheap check (importing megatron.core takes seconds)
        return True
    return subprocess.run([python, "-c", _PROBE], capture_output=True, cwd="/", env=isolated_env()).returncode == 0


def _has_helpers(python: str) -> bool:
    venv = os.path.dirname(os.path.dirname(python))
    for dirpath, _, files in os.walk(os.path.join(venv, "lib")):
        if dirpath.endswith(os.path.join("megatron", "core", "datasets")):
            return any(f.startswith("helpers_cpp") for f in files) and "indexed_dataset.py" in files
    return False


def _link_our_torch(venv_dir: str, python: str, timeout: float) -> bool:
    """The cheap venv: megatron-core alone (no dependencies) in a venv without pip, whose site-packages
    names ours in a .pth file for torch, numpy and packaging (its only requirements) — the same torch
    as ours, not another copy to install (~1 min of CPU). Only that directory joins the path, not its
    own .pth files (so not our editable `megatron`). False (and nothing left behind) where this does
    not give an importable megatron-core, e.g. no wheel to install; the full venv is built instead."""
    import importlib.util  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    torch_spec = importlib.util.find_spec("torch")
    if torch_spec is None or torch_spec.origin is None:
        return False
    ours = os.path.dirname(os.path.dirname(torch_spec.origin))  # the site-packages holding our torch
    if os.path.isdir(os.path.join(ours, "megatron")):  # our package installed there would shadow megatron-core's
        return False
    res = subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv_dir], capture_output=True,
                         timeout=timeout, env=isolated_env())
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, env=isolated_env()) if res.returncode == 0 else res
    if site.returncode == 0:
        target = site.stdout.strip()
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                              "--target", target, f"megatron-core=={MCORE_VERSION}"],
                             capture_output=True, timeout=timeout, env=isolated_env())
        if res.returncode == 0:
            with open(os.path.join(target, "our_torch.pth"), "w") as f:
                f.write(ours + "\n")
            probe = subprocess.run([python, "-c", _PROBE], capture_output=True, cwd="/", env=isolated_env())
            if probe.returncode == 0:
                return True
    shutil.rmtree(venv_dir, ignore_errors=True)
    return False


def ensure_mcore_venv(venv: str | None = None, timeout: float = 600) -> str:
    """Path of a python with megatron-core importable; creates the venv if needed.

    Raises RuntimeError (with pip's last lines) if it cannot be created (e.g. no index access).
    """
    python = venv_python(venv)
    if _works(python):
        return python
    venv_dir = os.path.dirname(os.path.dirname(python))
    if _link_our_torch(venv_dir, python, timeout):
        return python
    steps = [[sys.executable, "-m", "venv", venv_dir],
             [python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
              f"torch=={TORCH_VERSION}", f"megatron-core=={MCORE_VERSION}"]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=isolated_env())
        if res.returncode != 0:
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"cannot create the megatron-core venv {venv_dir}: {' '.join(cmd[:4])} ... failed: {tail}")
    if not _works(python):
        raise RuntimeError(f"megatron-core does not import in {venv_dir}")
    return python


if __name__ == "__main__":
    print(ensure_mcore_venv())
