"""Helpers that run the real trainer in 1 or 2 gloo processes (torchrun, mpiexec or plain python)
and read back its per-iteration metrics. Shared by the end-to-end tests."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from megatron.launch_env import free_port  # noqa: F401  (the tests' MASTER_PORT)

try:
    from warm import Zygote  # tests/ on sys.path (pytest)
except ImportError:  # imported as tests.distributed (bench/scaling.py)
    from tests.warm import Zygote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny Llama: fast on 2 cores, still every code path of the real one.
TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-key-value-heads", "2",
    "--ffn-hidden-size", "128", "--seq-length", "32", "--max-position-embeddings", "64",
    "--swiglu", "--normalization", "rmsnorm", "--disable-bias-linear", "--use-rotary-position-embeddings",
    "--untie-embeddings-and-output-weights", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "500",
]


def make_dataset(directory: str, n_docs: int = 400, vocab: int = 500, seed: int = 0) -> str:
    """Write a small .bin/.idx corpus with learnable structure and its data list; returns the list path."""
    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "toy_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        start = int(rng.integers(0, vocab - 1))
        length = int(rng.integers(20, 120))
        doc = (start + np.arange(length) * int(rng.integers(1, 4))) % (vocab - 1)  # arithmetic runs
        builder.add_document(doc.astype(np.uint16))
    builder.finalize(prefix + ".idx")
    data_list = os.path.join(directory, "toy.txt")
    with open(data_list, "w") as f:
        f.write(f"1.0 {prefix} toy\n")
    return data_list


def env_for(nproc: int, threads: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # one thread per process by default: the tiny models gain nothing from a second one, and OpenMP threads that
    # share a core (2 xdist workers on 2 cores, or `taskset -c 0`) spin-wait: 20 steps of the tiny model took
    # 10-14 s of CPU at 2 threads on a loaded 2-core machine, 2.2-2.5 s at 1
    env["OMP_NUM_THREADS"] = str(threads or 1)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env["DS_ACCELERATOR"] = "cpu"
    return env


def become_rank(rank: int, nproc: int, port: int) -> None:
    """In a spawned worker: the environment of rank `rank` of `nproc` gloo ranks on this host (one thread)."""
    import torch  # noqa: PLC0415

    os.environ.update(env_for(nproc))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def launch_command(nproc: int, launcher: str) -> list[str]:
    script = os.path.join(ROOT, "pretrain_gpt.py")
    if nproc == 1 and launcher == "python":
        return [sys.executable, script]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script]
    if launcher == "mpiexec":
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        if not os.path.exists(mpiexec):
            mpiexec = shutil.which("mpiexec")
        return [mpiexec, "-n", str(nproc), sys.executable, script]
    raise ValueError(launcher)


_ZYGOTE: Zygote | None = None


def warm_zygote() -> Zygote:
    """This pytest process's warm trainer process (tests/warm.py), started on first use."""
    global _ZYGOTE
    if _ZYGOTE is None:
        _ZYGOTE = Zygote(env_for(1), ROOT)
    return _ZYGOTE


def start_process(cmd: list[str], env: dict, stdout: str, stderr: str):
    """`cmd` with `env` in ROOT, its output to the files `stdout` and `stderr`: forked from this pytest
    process's warm trainer process where that gives what a fresh process would (tests/warm.py: a
    `python <script>` command whose environment differs from the warm process's only in variables read at
    run time), else a fresh `subprocess.Popen`; stdin from /dev/null either way. TEST_WARM=0 (in the
    environment, or in `env`) starts every process fresh."""
    if env.get("TEST_WARM", "1") != "0" and warm_zygote().accepts(cmd, env):
        return warm_zygote().start(cmd, env, ROOT, stdout, stderr)
    with open(stdout, "w") as out, open(stderr, "w") as err:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err)


def run_processes(cmd: list[str], envs: list[dict], timeout: int) -> subprocess.CompletedProcess:
    """One process of `cmd` per environment in `envs` (`start_process`). As under torchrun, the first
    process that fails stops the others; the result holds its exit status and the outputs in order."""
    procs = []
    with tempfile.TemporaryDirectory() as logs:
        log = lambda i, kind: os.path.join(logs, f"{i}.{kind}")  # noqa: E731
        for i, env in enumerate(envs):
            procs.append(start_process(cmd, env, log(i, "out"), log(i, "err")))
        deadline, status = time.monotonic() + timeout, None
        while status is None:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c]
            if failed or None not in codes:  # a failed process (the first in order) or all done
                status = failed[0] if failed else 0
            elif time.monotonic() > deadline:
                break
            else:
                time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if status is None:
            raise subprocess.TimeoutExpired(cmd, timeout)
        out, err = ["".join(open(log(i, kind)).read() for i in range(len(envs))) for kind in ("out", "err")]
    return subprocess.CompletedProcess(cmd, status, out, err)


def run_ranks(cmd: list[str], nproc: int, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """`nproc` ranks of `cmd` started directly with the variables torchrun gives its workers (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), without torchrun's agent process (its
    own `import torch` is ~2 s of CPU per launch); `run_processes` otherwise."""
    port = free_port()
    return run_processes(cmd, [{**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                                "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
                               for rank in range(nproc)], timeout)


def run_trainer(args: list[str], nproc: int = 1, launcher: str = "python", timeout: int = 600,
                check: bool = True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """The trainer in `nproc` processes started by `launcher`: "python" (one process), "torchrun",
    "mpiexec", or "ranks" (the ranks directly with torchrun's variables: the tests that are not about
    the launcher itself, without the cost of torchrun's agent). "python" and "ranks" processes are forked
    from a warm process where that is the same as a fresh one (`start_process`). Without --peak-tflops in
    `args` it gets --peak-tflops 1: the trainer would otherwise measure the MFU peak at start (0.3 s of
    matmuls per rank), which test_mfu.py tests and no trainer test here reads."""
    if "--peak-tflops" not in args:
        args = [*args, "--peak-tflops", "1"]
    env = env_for(nproc)
    if launcher == "mpiexec":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(env_extra or {})
    script = os.path.join(ROOT, "pretrain_gpt.py")
    if launcher == "ranks":
        proc = run_ranks([sys.executable, script, *args], nproc, env, timeout)
    elif launcher == "python" and nproc == 1:
        proc = run_processes([sys.executable, script, *args], [env], timeout)
    else:
        proc = subprocess.run(launch_command(nproc, launcher) + args, env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(path: str) -> tuple[dict[int, float], list[dict]]:
    """(per-iteration training loss, validation records) from a metrics.jsonl file."""
    train, val = {}, []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "lm_loss" in r:
                train[r["iteration"]] = r["lm_loss"]
            elif "val_loss" in r:
                val.append(r)
    return train, val


def _in_env(rank: int, fn, env: dict, cwd: str, *args) -> None:
    """In a forked process: the environment and working directory of the test that started it (the fork
    server keeps the ones of the first test that used it), then `fn(rank, *args)`."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fn(rank, *args)


def spawn(fn, args: tuple, nprocs: int) -> None:
    """`torch.multiprocessing.spawn(fn, args, nprocs)`, with the processes forked from multiprocessing's
    fork server: a single-threaded process that imported torch once for this pytest process (a spawned
    process spent ~1.4 s of CPU on its own `import torch`). They start from the calling test's
    environment and working directory and import everything else themselves, as spawned ones did."""
    import multiprocessing  # noqa: PLC0415

    import torch.multiprocessing as mp  # noqa: PLC0415

    multiprocessing.set_forkserver_preload(["torch"])
    mp.start_processes(_in_env, args=(fn, dict(os.environ), os.getcwd(), *args), nprocs=nprocs,
                       start_method="forkserver")


def spawn_workers(worker, nprocs: int, out_dir: str) -> list:
    """Run `worker(rank, port, out_dir)` in `nprocs` fresh processes (`spawn`); each saves its results
    to `<out_dir>/rank<r>.pt`; returns them in rank order."""
    import torch  # noqa: PLC0415

    spawn(worker, (free_port(), out_dir), nprocs)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(nprocs)]


def engine_with(args, **replaced):
    """The trainer's engine for `args` (`training.setup_model_and_optimizer`, seed 1234), built with the
    named `megatron.deepspeed_compat` functions replaced by the given ones (`lambda engine: False`: that
    change left out, DeepSpeed as is); the originals are put back afterwards."""
    import torch  # noqa: PLC0415

    from megatron import deepspeed_compat, training  # noqa: PLC0415

    originals = {name: getattr(deepspeed_compat, name) for name in replaced}
    for name, function in replaced.items():
        setattr(deepspeed_compat, name, function)
    try:
        torch.manual_seed(1234)
        return training.setup_model_and_optimizer(args)[1]
    finally:
        for name, function in originals.items():
            setattr(deepspeed_compat, name, function)


def parallel_test_config(**overrides):
    """The small GQA GPTConfig the in-process TP and Ulysses equivalence tests build (vocab 256,
    2 layers, 4 heads / 2 KV heads, no dropout), with `overrides`."""
    from megatron.model import GPTConfig  # noqa: PLC0415

    base = {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "ffn_hidden_size": 96, "max_position_embeddings": 32, "hidden_dropout": 0.0,
            "attention_dropout": 0.0, "init_method_std": 0.05}
    base.update(overrides)
    return GPTConfig(**base)

