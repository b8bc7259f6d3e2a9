"""One of 2 ranks dies (SIGKILL) or hangs (SIGSTOP) mid-training: the survivor exits non-zero with
one line naming the rank, well within 2 x --distributed-timeout-minutes (set to 12 s here).

Faults are injected with MEGATRON_TEST_FAULTS (``kill@3:1``: rank 1 sends itself SIGKILL in
iteration 3). Ranks are started as two plain processes (so nothing but our code reacts), and
under torchrun and mpiexec (whose own tear-down is what a user sees there)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from distributed import TINY_MODEL, env_for, free_port, launch_command, make_dataset

from megatron.resilience import dist_faults

TIMEOUT_MIN = 0.2  # 12 s: small, with a margin for a loaded machine
TIMEOUT_S = 60 * TIMEOUT_MIN


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("toy-data")))


def trainer_args(data_list: str, out: str) -> list[str]:
    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "50", "--lr", "0.003",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", "--zero-stage", "1", "--deepspeed",
        "--distributed-timeout-minutes", str(TIMEOUT_MIN), "--metrics-file", os.path.join(out, "metrics.jsonl"),
    ]


def _wait_for_line(path: str, text: str, procs, limit: float = 240.0) -> float:
    """Poll a log file until `text` appears; returns the time it was seen."""
    end = time.time() + limit
    while time.time() < end:
        with open(path, errors="replace") as f:
            if text in f.read():
                return time.time()
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    with open(path, errors="replace") as f:
        raise AssertionError(f"{text!r} never appeared:\n{f.read()[-4000:]}")


def _wait_exit(proc: subprocess.Popen, limit: float) -> float | None:
    end = time.time() + limit
    while time.time() < end:
        if proc.poll() is not None:
            return time.time()
        time.sleep(0.05)
    return None


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("ERROR:")]


def start_two_plain(args: list[str], out: str, faults: str) -> tuple[list[subprocess.Popen], list[str]]:
    """Two ranks as independent processes (env:// rendezvous), each logging to its own file."""
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        env = env_for(2)
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), MEGATRON_TEST_FAULTS=faults, PYTHONUNBUFFERED="1")
        path = os.path.join(out, f"rank{rank}.log")
        with open(path, "w") as log:
            procs.append(subprocess.Popen(launch_command(1, "python") + args, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        logs.append(path)
    return procs, logs


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_killed_rank_named_by_survivor(data_list, tmp_path):
    """Rank 1 SIGKILLed in iteration 3: rank 0 exits 5 within 2 x timeout with one ERROR line naming rank 1."""
    out = str(tmp_path)
    procs, logs = start_two_plain(trainer_args(data_list, out), out, "kill@3:1")
    try:
        t_kill = _wait_for_line(logs[1], "sending myself SIGKILL", procs)
        t_exit = _wait_exit(procs[0], 4 * TIMEOUT_S)
        assert t_exit is not None, "rank 0 still running 4 x timeout after rank 1 died"
    finally:
        _kill_all(procs)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == dist_faults.EXIT_CODE
    assert t_exit - t_kill < 2 * TIMEOUT_S, t_exit - t_kill
    with open(logs[0]) as f:
        text = f.read()
    errors = _error_lines(text)
    assert len(errors) == 1, text[-3000:]
    assert errors[0].startswith("ERROR: rank 0: a collective operation failed (Connection")
    assert "no answer from rank 1 within 3 s (died or hangs)" in errors[0]
    assert "resumes from the last checkpoint" in errors[0]
    assert "Traceback" not in text


@pytest.mark.slow
def test_hung_rank_times_out(data_list, tmp_path):
    """Rank 1 stops (SIGSTOP) in iteration 3: rank 0's collective times out after ~12 s and it exits 5
    before 2 x timeout, naming the timeout and rank 1."""
    out = str(tmp_path)
    procs, logs = start_two_plain(trainer_args(data_list, out), out, "stop@3:1")
    try:
        t_stop = _wait_for_line(logs[1], "sending myself SIGSTOP", procs)
        t_exit = _wait_exit(procs[0], 4 * TIMEOUT_S)
        assert t_exit is not None, "rank 0 still running 4 x timeout after rank 1 hung"
        assert procs[1].poll() is None  # still stopped, not dead
    finally:
        _kill_all(procs)
    assert procs[0].returncode == dist_faults.EXIT_CODE
    assert TIMEOUT_S * 0.8 <= t_exit - t_stop < 2 * TIMEOUT_S, t_exit - t_stop
    with open(logs[0]) as f:
        text = f.read()
    errors = _error_lines(text)
    assert len(errors) == 1, text[-3000:]
    assert "timed out after --distributed-timeout-minutes 0.2 (12 s)" in errors[0]
    assert "no answer from rank 1 within 3 s" in errors[0]


def _launch(launcher: str, args: list[str], out: str, faults: str) -> tuple[subprocess.Popen, str]:
    env = env_for(2)
    env.update(MEGATRON_TEST_FAULTS=faults, PYTHONUNBUFFERED="1", MEGATRON_LOG_ALL_RANKS="1")
    if launcher == "mpiexec":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    path = os.path.join(out, f"{launcher}.log")
    with open(path, "w") as log:
        proc = subprocess.Popen(launch_command(2, launcher) + args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, path


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_killed_rank_under_launcher(launcher, data_list, tmp_path):
    """Under torchrun / mpiexec the launcher exits non-zero within 2 x timeout of the kill, and its
    output names the killed rank (the launcher's own report, or our survivor's line)."""
    if launcher == "mpiexec" and not os.path.exists(launch_command(2, "mpiexec")[0] or ""):
        pytest.skip("no mpiexec")
    out = str(tmp_path)
    proc, path = _launch(launcher, trainer_args(data_list, out), out, "kill@3:1")
    try:
        t_kill = _wait_for_line(path, "sending myself SIGKILL", [proc])
        t_exit = _wait_exit(proc, 4 * TIMEOUT_S + 30)
        assert t_exit is not None, f"{launcher} still running after rank 1 died"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with open(path, errors="replace") as f:
        text = f.read()
    assert proc.returncode != 0
    assert t_exit - t_kill < 2 * TIMEOUT_S, (t_exit - t_kill, text[-3000:])
    ours = [ln for ln in _error_lines(text) if "no answer from rank 1" in ln]
    if launcher == "torchrun":
        # torchrun's summary: the failed local rank, its exit code and the signal
        assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", text), text[-3000:]
        assert "Signal 9 (SIGKILL)" in text, text[-3000:]
    else:
        # MPICH's hydra stops the survivor at once and reports the killed process (by PID, not rank);
        # when the survivor is faster, it names rank 1 itself
        assert ours or ("BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES" in text
                        and "Killed (signal 9)" in text), text[-3000:]


def test_collective_failure_classification():
    assert not dist_faults.is_collective_failure(ValueError("Connection reset by peer"))
    assert not dist_faults.is_collective_failure(RuntimeError("size mismatch for weight"))  # dist not initialized
    assert dist_faults._short_reason(RuntimeError(
        "[pair.cc:537] Read error [127.0.0.1]:40359: Connection reset by peer. This is typically")) == \
        "Connection reset by peer"
    assert dist_faults._short_reason(RuntimeError("[gloo] Timed out waiting 6000ms for recv operation")) == "timed out"


def test_describe_names_missing_ranks(monkeypatch):
    monkeypatch.setattr(dist_faults, "missing_ranks", lambda rank, world, wait: ([1, 3], None))
    msg = dist_faults.describe(RuntimeError("Connection closed by peer"), 0, 4, 0.1)
    assert msg == ("rank 0: a collective operation failed (Connection closed by peer); no answer from ranks 1, 3 "
                   "within 1.5 s (died or hangs); the run cannot continue: restart it, it resumes from the last "
                   "checkpoint")
    monkeypatch.setattr(dist_faults, "missing_ranks",
                        lambda rank, world, wait: (None, ("the rendezvous store is unreachable (Connection "
                                                          "refused), so the rank hosting it is gone")))
    msg = dist_faults.describe(RuntimeError("Timed out"), 1, 2, 10)
    assert msg.startswith("rank 1: a collective operation failed (timed out after --distributed-timeout-minutes 10 "
                          "(600 s)); the rendezvous store is unreachable")
    assert "within 5 s" not in msg


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
