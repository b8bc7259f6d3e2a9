"""Golden launches: what `DRY_RUN=1 bash train_alcf.sh` prints on each machine, at 1, 2 and 256 nodes.

Each case fakes the machine: its host name (ALCF_HOSTNAME), its job (a PBS nodefile of N hosts, or
SLURM variables on Perlmutter), its GPUs (a stand-in `nvidia-smi -L` on NVIDIA machines; Aurora and
Sunspot count 12 tiles per node by name), its cores (a stand-in `nproc`) and its mpiexec (Cray PALS:
a path that does not exist here, so no local MPICH is asked). The printed config + command, with
this machine's paths replaced by placeholders, must equal tests/assets/launch/<case>.txt, and the
command must pass the trainer's own argument checks with the world size it was built for.

Regenerate after an intended change (then review the diff: it shows what changed on every machine):

    UPDATE_GOLDEN=1 python -m pytest -q tests/test_launch_golden.py
"""
from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "assets" / "launch"
PALS_MPIEXEC = "/opt/cray/pals/1.4/bin/mpiexec"

# machine: (host name, GPUs per node reported by nvidia-smi (0: none), cores per node, scheduler)
MACHINES = {
    "aurora": ("x4102c0s0b0n0", 0, 208, "pbs"),
    "sunspot": ("x1921c0s0b0n0", 0, 208, "pbs"),
    "polaris": ("x3005c0s7b0n0", 4, 64, "pbs"),
    "sophia": ("sophia-gpu-01", 8, 256, "pbs"),
    "perlmutter": ("nid001234", 4, 128, "slurm"),
    "unknown": ("mybox", 0, 32, "pbs"),
}
SIZES = (1, 2, 256)
CASES = [(m, n) for m in MACHINES for n in SIZES]


def _shim(bindir: Path, name: str, body: str) -> None:
    p = bindir / name
    p.write_text(f"#!/bin/sh\n{body}\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def dry_run(machine: str, nodes: int, tmp: Path) -> tuple[str, str]:
    """(output with placeholders for this machine's paths, raw output)"""
    host, gpus, cores, sched = MACHINES[machine]
    bindir, wd = tmp / "bin", tmp / "wd"
    bindir.mkdir()
    (wd / "lists").mkdir(parents=True)
    (wd / "lists" / "dolma.txt").write_text("1.0 /data/dolma/dolma-0000_text_document dolma\n")
    _shim(bindir, "nproc", f"echo {cores}")
    if gpus:
        _shim(bindir, "nvidia-smi", "\n".join(f"echo 'GPU {i}: NVIDIA A100'" for i in range(gpus)))
    env = {"PATH": f"{bindir}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp), "LANG": "C.UTF-8", "DRY_RUN": "1",
           "ALCF_HOSTNAME": host, "MPIEXEC": PALS_MPIEXEC, "WORKING_DIR": str(wd),
           "DATA_FILE_LIST": str(wd / "lists" / "dolma.txt"), "PYTHON": "python3", "VIRTUAL_ENV": "/venv",
           "MASTER_PORT": "29500", "ALCF_CPUINFO": os.environ["ALCF_CPUINFO"]}
    if sched == "pbs":
        nodefile = tmp / "nodefile"
        nodefile.write_text("".join(f"{host[:-1] if host[-1].isdigit() else host}{i}\n" for i in range(nodes)))
        env["PBS_NODEFILE"] = str(nodefile)
    else:
        env.update(SLURM_JOB_ID="42", SLURM_NNODES=str(nodes), SLURM_GPUS_ON_NODE=str(gpus))
    p = subprocess.run(["bash", str(ROOT / "train_alcf.sh")], env=env, cwd=wd, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.replace(str(tmp), "<TMP>").replace(str(ROOT), "<REPO>"), p.stdout


def trainer_argv(out: str) -> list[str]:
    lines = out[out.index("# command:\n") + len("# command:\n"):].replace("\\\n", " ")
    words = shlex.split(lines)
    return words[next(i for i, w in enumerate(words) if w.endswith("pretrain_gpt.py")) + 1:]


@pytest.mark.parametrize("machine,nodes", CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_golden_launch(machine, nodes, tmp_path, monkeypatch):
    out, raw = dry_run(machine, nodes, tmp_path)
    golden = GOLDEN / f"{machine}-{nodes}node{'s' if nodes > 1 else ''}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(out)
    assert golden.exists(), f"no golden file {golden.name}: UPDATE_GOLDEN=1 python -m pytest {__file__}"
    assert out == golden.read_text(), f"{golden.name} changed; if intended: UPDATE_GOLDEN=1 python -m pytest " \
                                      f"tests/test_launch_golden.py, and review the diff"

    # the trainer's own checks accept the command at the world size it was built for
    from megatron.arguments import parse_args

    world = int(out.split("world size ")[1].split()[0])
    monkeypatch.chdir(tmp_path)
    args = parse_args(trainer_argv(raw), env={"WORLD_SIZE": str(world)})
    assert args.world_size == world
    assert args.global_batch_size == args.micro_batch_size * args.num_micro_batches * args.data_parallel_size


def test_golden_files_are_all_tested():
    assert sorted(p.name for p in GOLDEN.glob("*.txt")) == sorted(
        f"{m}-{n}node{'s' if n > 1 else ''}.txt" for m, n in CASES)


def test_machine_facts_in_the_goldens():
    """A few numbers worked out by hand, so the goldens are not only self-consistent."""
    def read(name):
        return (GOLDEN / name).read_text()

    a = read("aurora-256nodes.txt")  # 256 x 12 ranks, GAS 1 at >= 256 nodes, MB 1: GBS 3072
    assert "world size 3072 = 256 host(s) x 12 process(es)" in a and "--global-batch-size=3072" in a
    assert "-n 3072" in a and "-ppn 12" in a and "--cpu-bind=list:2-4:10-12" in a
    assert "--distributed-backend=ccl" in a and "--bf16" in a
    a = read("aurora-2nodes.txt")  # 24 ranks, GAS 16: GBS 384
    assert "--global-batch-size=384" in a and '"gradient_accumulation_steps": 16' in a
    p = read("polaris-2nodes.txt")  # 2 x 4 GPUs, MB 1 (<3 nodes), GAS 8: GBS 64; depth 64/2/4 = 8
    assert "-n 8" in p and "-ppn 4" in p and "--cpu-bind=depth \\\n  -d 8" in p and "--global-batch-size=64" in p
    assert "--distributed-backend=nccl" in p
    p = read("polaris-256nodes.txt")  # 1024 GPUs, MB 4 (>= 8 nodes), GAS 8: GBS 32768
    assert "--micro-batch-size=4" in p and "--global-batch-size=32768" in p
    s = read("sophia-1node.txt")  # 8 GPUs, GAS 8: GBS 64
    assert "-n 8" in s and "--global-batch-size=64" in s and "--bf16" in s
    n = read("perlmutter-2nodes.txt")  # srun, 8 GPUs, TP 2 -> DP 4, GBS 4
    assert "srun \\\n  -u \\\n  -N 2 \\\n  -n 8" in n and "--tensor-model-parallel-size=2" in n
    assert "--global-batch-size=4" in n
    u = read("unknown-2nodes.txt")  # no GPUs: one rank per host, fp32, no backend flag
    assert "-n 2" in u and "-ppn 1" in u and "--bf16" not in u and "--distributed-backend" not in u
