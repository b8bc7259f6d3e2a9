"""Start-up: launch of the demo (`bash train_alcf.sh` with no data list) to the end of its first
training step, with a warm cache, and where the time goes.

    python bench/startup.py [--rounds 3]

The demo's trainer command is taken from `DRY_RUN=1 bash train_alcf.sh` (so it is the command
users run), with its outputs moved to a temporary directory, `--train-iters 2` and the demo data
built once beforehand (`tools/build_demo_data.py`, as the launcher does). A first, untimed run
warms the caches (data indices, DeepSpeed's compiled extension, the OS page cache). Each timed
run starts a fresh Python process that installs timing probes around the trainer's phases and
then runs `pretrain_gpt.main` with the demo's arguments; the probes print seconds since the
process was launched:

    interpreter   process launch -> this script's first line
    imports       pretrain_gpt / megatron / torch imports and argument parsing
    dist init     initialize_megatron: process group, deepspeed.init_distributed, groups, seeds
    tokenizer     tokenizer and padded vocabulary
    data index    build_datasets: .bin/.idx open, sample/shuffle/blend indices (cached)
    model build   GPTModel construction and initialization
    DS init       deepspeed.initialize (optimizer, ZeRO partitioning, scheduler)
    checkpoint load  load_checkpoint (nothing to load in the demo: a check)
    MFU peak      the logger's matmul peak measurement (skipped with --peak-tflops)
    eval on start the demo's --eval-on-start evaluation
    step 1        the first training iteration (the data loader's first batch included)

The launcher's own time (bash, argument and DeepSpeed-config generation) is measured separately
with DRY_RUN=1 and added to the total. Final line: `first_step_seconds=<median total>`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ["interpreter", "imports", "dist init", "tokenizer", "data index", "model build", "DS init",
          "checkpoint load", "MFU peak", "eval on start", "step 1"]


def _probe(argv: list[str]) -> None:
    """Child: run the trainer with timing probes; print 'PHASE <name> <seconds since launch>' lines."""
    t_launch = float(os.environ["BENCH_T_LAUNCH"])
    marks: list[tuple[str, float]] = [("interpreter", time.time())]

    def mark(name: str) -> None:
        marks.append((name, time.time()))

    import pretrain_gpt  # noqa: PLC0415
    from megatron import training  # noqa: PLC0415

    def after(fn, name):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            mark(name)
            return out
        return wrapped

    # initialize_megatron ends "dist init"; each later phase ends when its function returns
    training.initialize_megatron = after(training.initialize_megatron, "dist init")
    training.build_tokenizer_and_vocab = after(training.build_tokenizer_and_vocab, "tokenizer")
    training.build_datasets = after(training.build_datasets, "data index")
    training.GPTModel = after(training.GPTModel, "model build")
    training.checkpointing.load_checkpoint = after(training.checkpointing.load_checkpoint, "checkpoint load")
    from megatron.observability import training_log  # noqa: PLC0415

    training_log.resolve_peak = after(training_log.resolve_peak, "MFU peak")
    # the loop's evaluation and iterations go through its step runner (PP = 1 in the demo)
    runner = training.MicroBatchRunner
    runner.evaluate = after(runner.evaluate, "eval on start")
    real_step = runner.train

    def first_step(*a, **k):
        real_step(*a, **k)
        mark("step 1")
        starts = dict(marks)
        prev = t_launch
        for name in PHASES:  # phases in order; a missing probe shows as 0
            t = starts.get(name, prev)
            print(f"PHASE\t{name}\t{t - prev:.3f}", flush=True)
            prev = t
        print(f"PHASE\ttotal\t{prev - t_launch:.3f}", flush=True)
        os._exit(0)

    runner.train = first_step
    import deepspeed  # noqa: PLC0415

    real_init = deepspeed.initialize

    def ds_init(*a, **k):
        out = real_init(*a, **k)
        mark("DS init")
        return out

    deepspeed.initialize = ds_init
    # arguments are parsed inside main(): "imports" ends when initialize_megatron starts
    real_init_megatron = training.initialize_megatron

    def init_with_mark(args):
        mark("imports")
        return real_init_megatron(args)

    training.initialize_megatron = init_with_mark
    sys.exit(pretrain_gpt.main(argv))


def demo_command(env: dict) -> list[str]:
    """The demo's trainer argv (after pretrain_gpt.py) from the launcher's DRY_RUN output; the
    DeepSpeed config it prints is written where the launcher would write it (under WORKING_DIR)."""
    cwd = env.get("WORKING_DIR", ROOT)
    out = subprocess.run(["bash", os.path.join(ROOT, "train_alcf.sh")], env={**env, "DRY_RUN": "1"},
                         capture_output=True, text=True, cwd=cwd, check=True).stdout
    head, ds_json = out.split("# DeepSpeed config ", 1)
    ds_path, ds_json = ds_json.split(":\n", 1)
    ds_json = ds_json.split("\n# environment:", 1)[0]
    os.makedirs(os.path.dirname(os.path.join(cwd, ds_path)) or cwd, exist_ok=True)
    with open(os.path.join(cwd, ds_path), "w") as f:
        f.write(ds_json)
    lines = out.split("# command:", 1)[1].strip().splitlines()
    words = [w.strip().rstrip("\\").strip() for w in lines]
    words = [w for w in words if w]
    i = next(k for k, w in enumerate(words) if w.endswith("pretrain_gpt.py"))
    argv = []
    for w in words[i + 1:]:
        argv.extend(w.split(" ", 1) if w.startswith("--") and " " in w else [w])
    return argv


def override(argv: list[str], flag: str, value: str | None) -> list[str]:
    """Replace (or add) `flag` in argv, in both the '--f v' and '--f=v' forms; value None removes it."""
    out, skip = [], False
    for k, w in enumerate(argv):
        if skip:
            skip = False
            continue
        if w == flag:
            skip = k + 1 < len(argv) and not argv[k + 1].startswith("--")
            continue
        if w.startswith(flag + "="):
            continue
        out.append(w)
    return out + ([flag, value] if value is not None else [])


def demo_data_wait(args: list[str], env: dict, work: str, iters: int) -> float:
    """Share of the demo's iteration time spent waiting for data (its batch-generator timer, in the
    second half of a short run, so the loader's start-up is not counted)."""
    import json  # noqa: PLC0415

    metrics = os.path.join(work, "data-wait.jsonl")
    for flag, value in (("--train-iters", str(iters)), ("--timing-log-level", "2"), ("--eval-iters", "0"),
                        ("--log-interval", str(max(iters // 2, 1))), ("--metrics-file", metrics)):
        args = override(args, flag, value)
    args = override(args, "--eval-on-start", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *args], env=env, cwd=work,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(metrics) as f:
        last = [r for r in map(json.loads, f) if "timers_ms" in r][-1]
    return last["timers_ms"].get("batch-generator", 0.0) / last["ms_per_iter"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-wait-iters", type=int, default=20,
                   help="then run the demo this many iterations and report its data wait (0: skip)")
    p.add_argument("--probe", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.probe is not None:
        _probe(opts.probe)
        return {}
    from bench.common import machine_line, median, print_table  # noqa: PLC0415

    print(f"# startup: {machine_line()}", flush=True)
    work = tempfile.mkdtemp(prefix="bench-startup-")
    env = {**os.environ, "WORKING_DIR": work, "DEMO_DATA_DIR": os.path.join(work, "demo-data"),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DATA_FILE_LIST"):
        env.pop(k, None)
    launcher = []
    for _ in range(max(1, opts.rounds)):
        t0 = time.time()
        args = demo_command(env)
        launcher.append(time.time() - t0)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_demo_data.py"), "--output-dir",
                    env["DEMO_DATA_DIR"]], env=env, check=True, capture_output=True)
    run_dir = os.path.join(work, "run")
    for flag, value in (("--save", run_dir), ("--tensorboard-dir", os.path.join(run_dir, "tb")),
                        ("--data-cache-path", os.path.join(work, "index-cache")), ("--train-iters", "2"),
                        ("--save-interval", "1000")):
        args = override(args, flag, value)
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    phases: dict[str, list[float]] = {}
    for r in range(opts.rounds + 1):  # round 0 warms the caches
        env["BENCH_T_LAUNCH"] = repr(time.time())
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", *args], env=env, cwd=work,
                              capture_output=True, text=True)
        got = {ln.split("\t")[1]: float(ln.split("\t")[2]) for ln in proc.stdout.splitlines()
               if ln.startswith("PHASE\t")}
        if "total" not in got:
            raise SystemExit(f"startup probe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if r > 0:
            for k, v in got.items():
                phases.setdefault(k, []).append(v)
    rows = [["launcher (bash, DRY_RUN)", f"{median(launcher):.2f}"]]
    rows += [[n, f"{median(phases.get(n, [0.0])):.2f}"] for n in PHASES]
    total = median([t + median(launcher) for t in phases["total"]])
    rows.append(["total: launch -> first step", f"{total:.2f}"])
    wait = demo_data_wait(args, env, work, opts.data_wait_iters) if opts.data_wait_iters else None
    if wait is not None:
        rows.append([f"(demo data wait, iterations {opts.data_wait_iters // 2 + 1}-{opts.data_wait_iters})",
                     f"{wait * 100:.2f}% of step"])
    print_table(f"startup: demo config, warm cache, medians of {opts.rounds} runs", ["phase", "seconds"], rows)
    print(f"first_step_seconds={total:.2f}", flush=True)
    import shutil  # noqa: PLC0415

    shutil.rmtree(work, ignore_errors=True)
    return {"phases": phases, "launcher": launcher, "total": total}


if __name__ == "__main__":
    main()
