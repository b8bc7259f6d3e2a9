"""The warm trainer processes of tests/warm.py give what a fresh `python script.py` gives: a probe script
run both ways reports the same command line, `__main__`, environment, working directory, thread count,
stdin and output; forked, it ends with the exit status and the last stderr line the interpreter gives
(sys.exit(3), an uncaught exception, a message to sys.exit, a signal)."""
from __future__ import annotations

import json
import os
import sys

import pytest
from distributed import ROOT, env_for, start_process, warm_zygote

PROBE = r'''
import json, os, sys
import deepspeed  # noqa: F401  (what the warm process preloads)
import torch
mode = sys.argv[1]
print(json.dumps({"argv": sys.argv, "name": __name__, "path0": sys.path[0], "cwd": os.getcwd(),
                  "threads": torch.get_num_threads(), "var": os.environ.get("MEGATRON_PROBE"),
                  "nvml": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"), "stdin": sys.stdin.read()}))
print("to stderr", file=sys.stderr)
sys.stdout.flush()
if mode == "exit":
    sys.exit(3)
if mode == "raise":
    raise ValueError("probe failed")
if mode == "kill":
    os.kill(os.getpid(), 9)
if mode == "message":
    sys.exit("a message")
'''


def run(tmp_path, start, mode: str, threads: int = 1) -> tuple[int, dict, str]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {**env_for(1, threads), "MEGATRON_PROBE": mode}
    out, err = str(tmp_path / f"{mode}.out"), str(tmp_path / f"{mode}.err")
    code = start([sys.executable, str(script), mode, "x y"], env, out, err).wait()
    with open(out) as f, open(err) as g:
        return code, json.loads(f.readline()), g.read()


def forked(cmd, env, out, err):
    assert warm_zygote().accepts(cmd, env)
    return warm_zygote().start(cmd, env, ROOT, out, err)


def test_forked_probe_matches_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_WARM", "0")
    fresh_code, fresh, fresh_err = run(tmp_path, start_process, "ok", threads=2)
    warm_code, warm, warm_err = run(tmp_path, forked, "ok", threads=2)
    assert fresh_code == warm_code == 0
    assert fresh == warm and fresh_err == warm_err == "to stderr\n"
    assert warm["argv"] == [str(tmp_path / "probe.py"), "ok", "x y"] and warm["name"] == "__main__"
    assert warm["path0"] == str(tmp_path) and warm["cwd"] == ROOT and warm["threads"] == 2
    assert warm["stdin"] == "" and warm["var"] == "ok" and warm["nvml"] == "1"


@pytest.mark.parametrize("mode,code,last_line", [("exit", 3, "to stderr"), ("raise", 1, "ValueError: probe failed"),
                                                 ("message", 1, "a message"), ("kill", -9, "to stderr")])
def test_forked_probe_ends_as_the_interpreter_would(tmp_path, mode, code, last_line):
    warm_code, warm, warm_err = run(tmp_path, forked, mode)
    assert warm_code == code and warm["var"] == mode
    assert warm_err.splitlines()[-1] == last_line
    if mode == "raise":
        assert warm_err.splitlines()[1] == "Traceback (most recent call last):"


def test_environment_read_at_import_starts_fresh():
    zygote, cmd = warm_zygote(), [sys.executable, os.path.join(ROOT, "pretrain_gpt.py")]
    assert zygote.accepts(cmd, env_for(1))
    assert zygote.accepts(cmd, {**env_for(2), "RANK": "1", "MEGATRON_TEST_FAULTS": "nan@2", "WANDB_MODE": "x"})
    assert not zygote.accepts(cmd, {**env_for(1), "TORCHDYNAMO_DISABLE": "1"})  # TorchDynamo reads it at import
    assert not zygote.accepts(cmd, {**env_for(1), "DS_ACCELERATOR": "xpu"})  # DeepSpeed picks it at import
    assert not zygote.accepts(["bash", "train_alcf.sh"], env_for(1))


def test_importable_as_a_package_module():
    """bench/scaling.py imports `tests.distributed` from the repository root (no tests/ on sys.path)."""
    import subprocess  # noqa: PLC0415

    code = "import sys; sys.path[0] = sys.argv[1]; import tests.distributed as d; print(d.Zygote.__module__)"
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, cwd="/",
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0 and out.stdout.strip() == "tests.warm", out.stderr
