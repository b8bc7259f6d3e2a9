"""The data loader's worker processes are forked once, while the trainer runs no other Python thread.

Forking a process that runs other Python threads can leave the child deadlocked inside fork (CPython
3.11 re-initialising its thread states while another thread held the lock); the parent then waits for
a batch forever. This hung a 2-rank mpiexec run at its final evaluation, which forked fresh workers
while TensorBoard's writer and the training loader's queue feeders ran. The trainer now forks the
training loader's workers before the logger starts its threads, and evaluates in-process.

The trainer runs here under a wrapper that records, at every fork of the trainer process, the names
of the Python threads alive in it.
"""
from __future__ import annotations

import json
import subprocess
import sys

from distributed import ROOT, TINY_MODEL, env_for, make_dataset

WRAPPER = """
import json, os, runpy, sys, threading
main_pid, log = os.getpid(), sys.argv.pop(1)
def record():
    if os.getpid() == main_pid:
        with open(log, "a") as f:
            f.write(json.dumps([t.name for t in threading.enumerate()]) + "\\n")
os.register_at_fork(before=record)
sys.argv[0] = os.path.join({root!r}, "pretrain_gpt.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_workers_forked_once_with_no_other_thread_running(tmp_path):
    data_list = make_dataset(str(tmp_path / "data"))
    wrapper, log = tmp_path / "wrapper.py", tmp_path / "forks.jsonl"
    wrapper.write_text(WRAPPER.format(root=ROOT))
    args = TINY_MODEL + [
        "--data-file-list", data_list, "--split", "90,10,0", "--data-cache-path", str(tmp_path / "cache"),
        "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "3", "--lr", "1e-3",
        "--eval-interval", "1", "--eval-iters", "2", "--num-workers", "2", "--log-interval", "1",
        "--tensorboard-dir", str(tmp_path / "tb"), "--deepspeed", "--zero-stage", "0"]
    proc = subprocess.run([sys.executable, str(wrapper), str(log), *args], env=env_for(1), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "validation loss at iteration 2" in proc.stdout  # evaluations ran (at 1 and 2, and at the end)
    forks = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(forks) == 2, forks  # the training loader's 2 workers; evaluation forks nothing
    assert all(threads == ["MainThread"] for threads in forks), forks
