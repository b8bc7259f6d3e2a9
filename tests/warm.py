"""Trainer processes forked from a warm process instead of started from scratch.

Most of a tiny test trainer's CPU time is its imports: torch, torch._dynamo (torch.optim imports it when
it builds an optimizer) and DeepSpeed, ~1.4 s of ~2 s per process. `run_trainer` (tests/distributed.py)
starts `python pretrain_gpt.py ...` processes through a `Zygote` instead: a process of this file, one
per pytest process, that imported those once and forks a child per trainer. The child becomes what a
fresh `python pretrain_gpt.py args` would be, as far as the trainer can tell:

* its own process (own pid, exit status, signals: `kill` works on it, a signal death reads as -N);
* the request's environment, working directory, stdout/stderr files and stdin from /dev/null;
* `sys.argv` = [script, *args], `sys.path[0]` = the script's directory, the script run as `__main__`;
* torch's thread count from the request's OMP_NUM_THREADS (read by OpenMP when torch is imported);
* an uncaught exception prints its traceback and exits 1, `sys.exit(x)` exits x, as the interpreter does.

What it cannot give is what the preloaded modules read from the environment at import (DeepSpeed's
accelerator from DS_ACCELERATOR, TorchDynamo's TORCHDYNAMO_DISABLE, ...). So a request is forked only
when its environment equals the zygote's except in variables the trainer reads at run time
(`RUNTIME_VARS`); any other difference, and any other command, starts a fresh process as before.
TEST_WARM=0 starts every trainer fresh.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys

PRELOAD = ("torch", "torch._dynamo", "deepspeed")
# read by the trainer (or by nothing the zygote imports) only after it starts: they may differ per request
RUNTIME_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "OMP_NUM_THREADS", "PYTEST_CURRENT_TEST", "TEST_WARM"}
RUNTIME_PREFIXES = ("MEGATRON_", "WANDB_")


def _send(fd: int, message: dict) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def _lines(fd: int, buf: bytearray, timeout: float):
    """The complete JSON lines readable from `fd` within `timeout` s; None at end of file."""
    if select.select([fd], [], [], timeout)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        buf += chunk
    lines = []
    while b"\n" in buf:
        line, _, rest = bytes(buf).partition(b"\n")
        buf[:] = rest
        lines.append(json.loads(line))
    return lines


def _become(request: dict, imports_set: dict) -> None:
    """In the forked child: turn into `python <script> <args>` with the request's environment (and what the
    preloaded imports add to an environment, as they would in a fresh process); never returns."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        for key, value in imports_set.items():
            os.environ.setdefault(key, value)
        os.chdir(request["cwd"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((stdin, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        import runpy  # noqa: PLC0415

        import torch  # noqa: PLC0415

        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
        script = os.path.abspath(request["argv"][1])
        sys.argv = [script, *request["argv"][2:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  (what the interpreter prints for an uncaught exception)
        import traceback  # noqa: PLC0415

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The zygote: import PRELOAD, then fork a child per request read from stdin; report each child's pid
    when started and its exit code when it ends, one JSON line each on stdout. Ends (killing what still
    runs) when stdin closes."""
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # what the imports print goes nowhere, as the children's own output is theirs
    import importlib  # noqa: PLC0415

    before = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    imports_set = {k: v for k, v in os.environ.items() if before.get(k) != v}  # DeepSpeed sets one
    sys.stdout.flush()
    sys.stderr.flush()
    _send(replies, {"ready": os.getpid(), "imports_set": imports_set})
    children, buf = set(), bytearray()
    while True:
        lines = _lines(requests, buf, 0.02)
        if lines is None:
            break
        for request in lines:
            pid = os.fork()
            if pid == 0:
                os.close(requests)
                os.close(replies)
                _become(request, imports_set)
            children.add(pid)
            _send(replies, {"started": request["id"], "pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _send(replies, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})
    for pid in children:
        os.kill(pid, signal.SIGKILL)


class WarmProcess:
    """A child of the zygote, with the part of `subprocess.Popen`'s interface `run_ranks` uses."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid, self.returncode = zygote, pid, None

    def poll(self):
        if self.returncode is None:
            self.zygote.collect(0)
            self.returncode = self.zygote.exited.pop(self.pid, None)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self):
        while self.poll() is None:
            self.zygote.collect(0.05)
        return self.returncode


class Zygote:
    def __init__(self, env: dict, cwd: str):
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=self.env, cwd=cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buf, self.exited, self.started, self.next_id = bytearray(), {}, {}, 0
        self.imports_set = None  # from its "ready" message
        while self.imports_set is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the warm trainer process failed to start (exit {self.proc.returncode})")
            self.collect(1.0)
        atexit.register(self.close)

    def accepts(self, cmd: list[str], env: dict) -> bool:
        """Whether `cmd` with `env` can be forked from here with the result of a fresh process."""
        if self.proc.poll() is not None or cmd[0] != sys.executable or len(cmd) < 2 or not cmd[1].endswith(".py"):
            return False
        differ = {k for k in self.env.keys() | env.keys() if self.env.get(k) != env.get(k)
                  and not (k in self.imports_set and env.get(k) in (None, self.imports_set[k]))}
        return "OMP_NUM_THREADS" in env and all(k in RUNTIME_VARS or k.startswith(RUNTIME_PREFIXES) for k in differ)

    def collect(self, timeout: float) -> None:
        lines = _lines(self.proc.stdout.fileno(), self.buf, timeout)
        if lines is None:
            raise RuntimeError("the warm trainer process ended")
        for message in lines:
            if "exited" in message:
                self.exited[message["exited"]] = message["code"]
            elif "started" in message:
                self.started[message["started"]] = message["pid"]
            else:
                self.imports_set = message["imports_set"]

    def start(self, cmd: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> WarmProcess:
        self.next_id += 1
        request = {"id": self.next_id, "argv": cmd, "env": env, "cwd": cwd, "stdout": stdout, "stderr": stderr}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        while self.next_id not in self.started:
            self.collect(1.0)
        return WarmProcess(self, self.started.pop(self.next_id))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


if __name__ == "__main__":
    serve()
