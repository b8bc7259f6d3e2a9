#!/usr/bin/env python
"""Soak test: a long run stopped by SIGTERM / SIGKILL, with a damaged checkpoint on the way, and
resumed each time, logs exactly the losses of an uninterrupted run.

Two runs of the same configuration, from the same seed:

* the reference trains `--steps` iterations in one process;
* the interrupted run saves every `--save-interval` iterations and is stopped as soon as it passes
  each multiple of `--stop-every`, with the next of `--signals` (cycled):
  - `term`: SIGTERM; with `--exit-signal-handler` it saves a checkpoint and exits 0;
  - `kill`: SIGKILL, no handler, nothing saved: the next process resumes from the last periodic
    checkpoint and trains the iterations after it again;
  and the script restarts it with the same command (`--load`) until it reaches `--steps`.
* `--damage truncate|bitflip --damage-at K`: before restart K the newest checkpoint's model file is
  cut in half / gets one bit flipped. The command carries `--verify-checkpoint
  --fallback-to-intact-checkpoint`, as the job script of an unattended run that is resubmitted
  after a failure would (without `--verify-checkpoint` only sizes are checked: a flipped bit would
  load): the trainer finds the damage (manifest), warns, and resumes from the newest intact
  checkpoint (interactively one would read the refusal and pass the `--load-tag` it names instead:
  same checkpoint, same losses).

Then every training loss the interrupted run logged (re-run iterations included, each time) is
compared with the reference's loss at that iteration; all must be equal (bit for bit). Exit 0 when
they are, 1 otherwise; a JSON summary goes to stdout (and `--summary FILE`).

Presets: `demo` is the model, data and optimizer that `bash train_alcf.sh` trains with no
`DATA_FILE_LIST` (read from the launcher's `DRY_RUN=1` command, so it follows the launcher);
`tiny` is the 2-layer test model on a synthetic corpus (the reduced soak of the test suite).

    python tests/soak.py --preset demo --steps 2000 --save-interval 50 --stop-every 300 --signals kill,term \\
        --damage bitflip --damage-at 3 --jobs 2 --workdir /tmp/soak
    python tests/soak.py --preset tiny --steps 120 --save-interval 10 --stop-every 40 --signals kill,term \\
        --damage truncate --damage-at 2 --jobs 2 --workdir /tmp/soak-tiny
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):  # tests/ (distributed.py) and the project (megatron, tools)
    if _path not in sys.path:
        sys.path.insert(0, _path)
from distributed import ROOT, TINY_MODEL, env_for, launch_command, make_dataset  # noqa: E402

from megatron.checkpoint.manifest import checkpoint_tags, read_tag  # noqa: E402

# flags of the preset that the soak sets itself (with the number of values each takes)
OWN_FLAGS = {"--save": 1, "--load": 1, "--tensorboard-dir": 1, "--data-cache-path": 1, "--deepspeed_config": 1,
             "--train-iters": 1, "--save-interval": 1, "--log-interval": 1, "--metrics-file": 1,
             "--exit-signal-handler": 0, "--keep-last-n": 1, "--exit-interval": 1,
             "--fallback-to-intact-checkpoint": 0, "--verify-checkpoint": 0}


@dataclass
class Segment:
    """One process of the interrupted run."""
    start: int  # iteration it resumed from
    stop: int  # last iteration it trained
    signalled: str | None  # "term" / "kill": stopped by our SIGTERM / SIGKILL; None: it reached --steps
    seconds: float
    resumed_from_fallback: bool = False  # the newest checkpoint was damaged before it started


@dataclass
class SoakResult:
    preset: str
    steps: int
    save_interval: int
    stop_every: int
    reference_final_loss: float
    interrupted_final_loss: float
    max_abs_diff: float  # over every iteration both runs logged
    iterations_compared: int  # distinct iterations
    iterations_differing: int  # logged values (re-runs after a SIGKILL included) that differ from the reference
    values_compared: int = 0  # logged values compared (> iterations_compared when iterations were re-run)
    signals: str = "term"
    damage: str | None = None
    damage_at: int = 0
    segments: list[Segment] = field(default_factory=list)
    reference_seconds: float = 0.0
    interrupted_seconds: float = 0.0
    threads: int = 1

    @property
    def ok(self) -> bool:
        return self.iterations_differing == 0 and self.iterations_compared == self.steps


def _strip_flags(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in OWN_FLAGS:
            i += 1 + (OWN_FLAGS[name] if "=" not in a else 0)
            continue
        out.append(a)
        i += 1
    return out


def demo_flags(workdir: str) -> list[str]:
    """The demo's trainer flags, as `DRY_RUN=1 bash train_alcf.sh` prints them (demo data built in workdir)."""
    from tools.build_demo_data import build_demo_data

    data_dir = os.path.join(workdir, "demo-data")
    build_demo_data(data_dir)
    env = env_for(1)
    env.pop("DS_ACCELERATOR", None)
    for var in ("DATA_FILE_LIST", "PBS_NODEFILE", "HOSTFILE", "SLURM_JOB_ID", "PBS_JOBID"):
        env.pop(var, None)
    env.update(DRY_RUN="1", WORKING_DIR=workdir, DEMO_DATA_DIR=data_dir, PYTHON=sys.executable,
               VIRTUAL_ENV=sys.prefix, PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
    proc = subprocess.run(["bash", os.path.join(ROOT, "train_alcf.sh")], env=env, cwd=workdir,
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0 or "# command:" not in proc.stdout:
        raise RuntimeError(f"DRY_RUN=1 bash train_alcf.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    lines = proc.stdout.split("# command:", 1)[1].strip().splitlines()
    words = shlex.split(" ".join(ln.strip().rstrip("\\") for ln in lines if ln.strip() and not ln.startswith("#")))
    script = next(i for i, w in enumerate(words) if w.endswith("pretrain_gpt.py"))
    return _strip_flags(words[script + 1:])


def tiny_flags(workdir: str) -> list[str]:
    data_list = make_dataset(os.path.join(workdir, "toy-data"))
    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--lr", "0.003", "--min-lr", "0.0003", "--lr-decay-style", "cosine", "--lr-warmup-iters", "5",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95", "--eval-interval", "1000",
        "--eval-iters", "0", "--num-workers", "0", "--zero-stage", "1", "--deepspeed", "--seed", "1234",
    ]


PRESETS = {"demo": demo_flags, "tiny": tiny_flags}


def run_flags(base: list[str], out: str, steps: int, save_interval: int | None, segment: int | None) -> list[str]:
    name = "metrics.jsonl" if segment is None else f"metrics.{segment}.jsonl"
    flags = base + ["--train-iters", str(steps), "--log-interval", "1", "--data-cache-path", os.path.join(out, "cache"),
                    "--tensorboard-dir", os.path.join(out, "tensorboard"), "--metrics-file", os.path.join(out, name)]
    if save_interval:
        ckpt = os.path.join(out, "ckpt")
        flags += ["--save", ckpt, "--load", ckpt, "--save-interval", str(save_interval), "--keep-last-n", "2",
                  "--exit-signal-handler", "--fallback-to-intact-checkpoint", "--verify-checkpoint"]
    return flags


def read_losses(path: str) -> dict[int, float]:
    losses: dict[int, float] = {}
    if not os.path.exists(path):
        return losses
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if "lm_loss" in r:
                losses[int(r["iteration"])] = float(r["lm_loss"])
    return losses


def _env(threads: int) -> dict:
    env = env_for(1, threads=threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_reference(base: list[str], out: str, steps: int, threads: int) -> subprocess.Popen:
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "output.log"), "w")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(launch_command(1, "python") + run_flags(base, out, steps, None, None), env=_env(threads),
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def damage_checkpoint(ckpt: str, how: str) -> str:
    """Damage the newest checkpoint under `ckpt` the way storage does (`truncate`: cut the model file
    in half; `bitflip`: flip one bit in its middle); returns the path of the damaged file."""
    tag = read_tag(ckpt)
    path = os.path.join(ckpt, tag, "mp_rank_00_model_states.pt")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if how == "truncate":
            f.truncate(size // 2)
        elif how == "bitflip":
            f.seek(size // 2)
            byte = f.read(1)[0]
            f.seek(size // 2)
            f.write(bytes([byte ^ 0x10]))
        else:
            raise ValueError(f"unknown damage {how!r}")
    return path


def _tag_iteration(ckpt: str, tag: str | None = None) -> int:
    tag = tag or read_tag(ckpt)
    return int(tag[len("global_step"):]) if tag else 0


def run_interrupted(base: list[str], out: str, steps: int, save_interval: int, stop_every: int, threads: int,
                    timeout: float, signals: tuple[str, ...] = ("term",), damage: str | None = None,
                    damage_at: int = 0) -> tuple[dict[int, list[float]], list[Segment]]:
    """Train to `steps`, stopping the process after each multiple of `stop_every` with the next of
    `signals` (cycled): `term` = SIGTERM, which the trainer's handler turns into a checkpoint + exit 0;
    `kill` = SIGKILL, no handler: the next segment resumes from the last periodic checkpoint and re-runs
    the iterations after it. Before restart number `damage_at` (1 = the first restart) the newest
    checkpoint is damaged (`damage`); the run then resumes from the newest intact one, as a job script
    that carries `--fallback-to-intact-checkpoint` does. Returns every loss each iteration logged (several
    values for re-run iterations) and the segments."""
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, "ckpt")
    losses: dict[int, list[float]] = {}
    segments: list[Segment] = []
    start = 0
    deadline = time.time() + timeout
    while start < steps:
        seg = len(segments)
        done = max(losses, default=0)  # the furthest iteration any segment reached
        target = (done // stop_every + 1) * stop_every  # the next multiple of stop_every
        how = signals[seg % len(signals)]
        metrics = os.path.join(out, f"metrics.{seg}.jsonl")
        damaged = None
        if seg and seg == damage_at and damage:
            damaged = read_tag(ckpt)
            damage_checkpoint(ckpt, damage)
            intact = [t for _, t in checkpoint_tags(ckpt) if t != damaged]
            start = _tag_iteration(ckpt, intact[-1]) if intact else 0
        t0 = time.time()
        with open(os.path.join(out, f"output.{seg}.log"), "w") as log:
            proc = subprocess.Popen(launch_command(1, "python") + run_flags(base, out, steps, save_interval, seg),
                                    env=_env(threads), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            signalled = None
            while proc.poll() is None:
                if time.time() > deadline:
                    proc.kill()
                    raise TimeoutError(f"soak: segment {seg} still running after the {timeout:.0f} s budget")
                if target < steps and not signalled and max(read_losses(metrics), default=0) >= target:
                    proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
                    signalled = how
                time.sleep(0.1)
        with open(os.path.join(out, f"output.{seg}.log")) as f:
            output = f.read()
        if proc.returncode != (-signal.SIGKILL if signalled == "kill" else 0):
            raise RuntimeError(f"soak: segment {seg} exited {proc.returncode}:\n{output[-4000:]}")
        if damaged and f"{damaged} is damaged" not in output:
            raise RuntimeError(f"soak: segment {seg} did not report the damaged checkpoint {damaged}")
        got = read_losses(metrics)
        if not got or min(got) != start + 1:
            raise RuntimeError(f"soak: segment {seg} should have resumed at iteration {start + 1}, "
                               f"logged {sorted(got)[:3]}")
        for it, loss in got.items():
            losses.setdefault(it, []).append(loss)
        stop = max(got)
        segments.append(Segment(start=start, stop=stop, signalled=signalled, seconds=round(time.time() - t0, 1),
                                resumed_from_fallback=bool(damaged)))
        if stop <= start:
            raise RuntimeError(f"soak: segment {seg} made no progress")
        start = stop if signalled != "kill" else _tag_iteration(ckpt)  # SIGKILL: the last committed save
    return losses, segments


def soak(preset: str, steps: int, save_interval: int, stop_every: int, workdir: str, jobs: int = 1,
         threads: int | None = None, timeout: float = 6 * 3600, signals: tuple[str, ...] = ("term",),
         damage: str | None = None, damage_at: int = 0) -> SoakResult:
    """Run both runs under `workdir` (reference/, interrupted/) and compare them."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    for sub in ("reference", "interrupted"):
        shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
    base = PRESETS[preset](workdir)
    threads = threads or max(1, 2 // jobs)  # both runs use the same thread count (same float sums)
    ref_dir, int_dir = os.path.join(workdir, "reference"), os.path.join(workdir, "interrupted")
    t0 = time.time()
    ref = start_reference(base, ref_dir, steps, threads)
    ref_end: list[float] = []
    waiter = threading.Thread(target=lambda: (ref.wait(), ref_end.append(time.time())), daemon=True)
    waiter.start()
    if jobs == 1:
        waiter.join(timeout=timeout)
    t1 = time.time()
    got, segments = run_interrupted(base, int_dir, steps, save_interval, stop_every, threads, timeout, signals,
                                    damage, damage_at)
    t_int = time.time() - t1
    waiter.join(timeout=timeout)
    if not ref_end:
        ref.kill()
        raise TimeoutError(f"soak: the reference run still running after the {timeout:.0f} s budget")
    t_ref = ref_end[0] - t0
    if ref.returncode != 0:
        with open(os.path.join(ref_dir, "output.log")) as f:
            raise RuntimeError(f"soak: the reference run exited {ref.returncode}:\n{f.read()[-4000:]}")
    want = read_losses(os.path.join(ref_dir, "metrics.jsonl"))
    common = sorted(set(want) & set(got))
    diffs = [abs(want[i] - v) for i in common for v in got[i]]
    return SoakResult(preset=preset, steps=steps, save_interval=save_interval, stop_every=stop_every,
                      reference_final_loss=want.get(steps, float("nan")),
                      interrupted_final_loss=got.get(steps, [float("nan")])[-1],
                      max_abs_diff=max(diffs, default=float("nan")), iterations_compared=len(common),
                      iterations_differing=sum(d != 0.0 for d in diffs), values_compared=len(diffs),
                      signals=",".join(signals), damage=damage, damage_at=damage_at, segments=segments,
                      reference_seconds=round(t_ref, 1), interrupted_seconds=round(t_int, 1), threads=threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--save-interval", type=int, default=50)
    p.add_argument("--stop-every", "--sigterm-every", dest="stop_every", type=int, default=300,
                   help="stop the interrupted run after each multiple of this many iterations")
    p.add_argument("--signals", default="term",
                   help="comma-separated signals of the stops, cycled: term (SIGTERM: the trainer saves and exits) "
                        "and kill (SIGKILL: no handler, resume from the last periodic save); e.g. kill,term")
    p.add_argument("--damage", choices=("truncate", "bitflip"), default=None,
                   help="damage the newest checkpoint (its model file) before restart --damage-at")
    p.add_argument("--damage-at", type=int, default=1, help="the restart (1 = first) before which to damage it")
    p.add_argument("--workdir", required=True, help="scratch directory (reference/ and interrupted/ are replaced)")
    p.add_argument("--jobs", type=int, choices=(1, 2), default=1,
                   help="2: run the reference and the interrupted run at the same time (1 thread each)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both runs (default 2 / jobs)")
    p.add_argument("--timeout-hours", type=float, default=6.0)
    p.add_argument("--summary", default=None, help="also write the JSON summary here")
    a = p.parse_args(argv)
    if min(a.steps, a.save_interval, a.stop_every) <= 0:
        p.error("--steps, --save-interval and --stop-every must be > 0")
    signals = tuple(a.signals.split(","))
    if not signals or set(signals) - {"term", "kill"}:
        p.error(f"--signals takes term and/or kill, comma-separated (got {a.signals!r})")
    r = soak(a.preset, a.steps, a.save_interval, a.stop_every, a.workdir, a.jobs, a.threads,
             a.timeout_hours * 3600, signals, a.damage, a.damage_at if a.damage else 0)
    text = json.dumps({**asdict(r), "ok": r.ok}, indent=1)
    print(text)
    if a.summary:
        with open(a.summary, "w") as f:
            f.write(text + "\n")
    print(f"soak {'OK' if r.ok else 'FAILED'}: final loss {r.interrupted_final_loss!r} (interrupted, "
          f"{len(r.segments)} segments) vs {r.reference_final_loss!r} (uninterrupted); "
          f"{r.iterations_differing} of {r.values_compared} logged losses ({r.iterations_compared} iterations) differ (max |diff| {r.max_abs_diff:g})",
          file=sys.stderr)
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
