"""Tests of the launcher (train_alcf.sh + ALCF/helpers.sh), mostly through DRY_RUN=1.

DRY_RUN prints the DeepSpeed config JSON and the command one flag per line (a shell command
with `\\` continuations); `dry()` parses both back. Every case runs the real script in a
scrubbed environment (no scheduler variables leak in from the machine running the tests).
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from megatron.launch_env import ephemeral_port_range

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_alcf.sh"
GENERIC_HOST = "testbox"  # a host name no machine rule matches
AURORA_HOST = "x4102c0s0b0n0"
POLARIS_HOST = "x3005c0s7b0n0"
PALS_MPIEXEC = "/opt/cray/pals/1.4/bin/mpiexec"


@dataclass
class Dry:
    rc: int
    stdout: str
    stderr: str
    config: dict = field(default_factory=dict)
    lines: list = field(default_factory=list)  # the command, one printed line each (as tokens)
    argv: list = field(default_factory=list)  # the whole command
    flags: list = field(default_factory=list)  # [(flag, value or None)] after the script

    def last(self, flag: str):
        """Value argparse would keep (last occurrence); KeyError if absent."""
        vals = [v for f, v in self.flags if f == flag]
        if not vals:
            raise KeyError(flag)
        return vals[-1]

    def has(self, flag: str) -> bool:
        return any(f == flag for f, _ in self.flags)

    def count(self, flag: str) -> int:
        return sum(f == flag for f, _ in self.flags)


def base_env(**extra: str) -> dict:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "ALCF_HOSTNAME": GENERIC_HOST,
        "ALCF_CPUINFO": os.environ["ALCF_CPUINFO"],  # a CPU without native bf16 (tests/conftest.py)
        # the machines' own mpiexec (Cray PALS), not the venv's MPICH hydra, which gets -bind-to instead
        "MPIEXEC": PALS_MPIEXEC,
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(env: dict, args=(), dry_run: bool = True, cwd=None) -> subprocess.CompletedProcess:
    e = {k: str(v) for k, v in env.items()}
    if dry_run:
        e["DRY_RUN"] = "1"
    return subprocess.run(["bash", str(SCRIPT), *args], env=e, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=60)


def parse_flags(tokens: list[str]) -> list[tuple]:
    out, i = [], 0
    while i < len(tokens):
        t = tokens[i]
        if t.startswith("--") and "=" in t:
            k, v = t.split("=", 1)
            out.append((k, v))
        elif t.startswith("-") and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            out.append((t, tokens[i + 1]))
            i += 1
        else:
            out.append((t, None))
        i += 1
    return out


def parse_dry(p: subprocess.CompletedProcess) -> Dry:
    d = Dry(p.returncode, p.stdout, p.stderr)
    if p.returncode != 0:
        return d
    lines = p.stdout.splitlines()
    i = lines.index("{")
    j = lines.index("}", i)
    d.config = json.loads("\n".join(lines[i:j + 1]))
    k = lines.index("# command:")
    for line in lines[k + 1:]:
        line = line.rstrip()
        if line.endswith(" \\"):
            line = line[:-2]
        d.lines.append(shlex.split(line))
    d.argv = [t for line in d.lines for t in line]
    script = next(n for n, t in enumerate(d.argv) if t.endswith(".py"))
    d.flags = parse_flags(d.argv[script + 1:])
    return d


def dry(env: dict, args=()) -> Dry:
    d = parse_dry(run(env, args))
    assert d.rc == 0, f"rc={d.rc}\nstdout:\n{d.stdout}\nstderr:\n{d.stderr}"
    return d


@pytest.fixture
def wd(tmp_path):
    """A working directory with a one-line data list in it."""
    lst = tmp_path / "lists" / "books.txt"
    lst.parent.mkdir()
    lst.write_text("1.0 /data/books/books-0000_text_document books\n")
    return tmp_path


@pytest.fixture
def env(wd):
    return base_env(WORKING_DIR=str(wd), DATA_FILE_LIST=str(wd / "lists" / "books.txt"))


def hostfile(tmp_path: Path, n: int, prefix: str = "x4102c0s") -> Path:
    hf = tmp_path / f"nodefile{n}"
    hf.write_text("".join(f"{prefix}{i}b0n0\n" for i in range(n)))
    return hf


# ------------------------------------------------------------------------------------------------
# every env var -> its flag
# ------------------------------------------------------------------------------------------------
ENV_FLAG_CASES = [
    ({"HEADS": "8"}, "--num-attention-heads", "8"),
    ({"NHEADS": "8"}, "--num-attention-heads", "8"),
    ({"NLAYERS": "3"}, "--num-layers", "3"),
    ({"NUM_LAYERS": "3"}, "--num-layers", "3"),
    ({"HIDDEN": "1024"}, "--hidden-size", "1024"),
    ({"NUM_KV_HEAD": "4"}, "--num-key-value-heads", "4"),
    ({"FFN_HIDDEN_SIZE": "1000"}, "--ffn-hidden-size", "1000"),
    ({"SEQ": "128"}, "--seq-length", "128"),
    ({"SEQ_LEN": "128"}, "--seq-length", "128"),
    ({"SEQ_LEN": "128"}, "--max-position-embeddings", "2048"),
    ({"TP": "2", "NPROC": "2"}, "--tensor-model-parallel-size", "2"),
    ({"PP": "2", "NPROC": "2"}, "--pipeline-model-parallel-size", "2"),
    ({"SP": "2", "NPROC": "2"}, "--ds-sequence-parallel-size", "2"),
    ({"DTYPE": "bf16"}, "--bf16", None),
    ({"DTYPE": "fp16"}, "--fp16", None),
    ({"CCL": "ccl"}, "--distributed-backend", "ccl"),
    ({"NCCL": "nccl"}, "--distributed-backend", "nccl"),
    ({"BE": "gloo"}, "--distributed-backend", "gloo"),
    ({"OPT": "muon"}, "--optimizer", "muon"),
    ({"OPTIMIZER": "sophiag"}, "--optimizer", "sophiag"),
    ({"OPTIM": "adopt"}, "--optimizer", "adopt"),
    ({"OPT": "muon", "OPTIMIZER": "sophiag", "OPTIM": "adopt"}, "--optimizer", "muon"),
    ({"OPTIMIZER": "sophiag", "OPTIM": "adopt"}, "--optimizer", "sophiag"),
    ({"LR": "0.003"}, "--lr", "0.003"),
    ({"MIN_LR": "1e-5"}, "--min-lr", "1e-5"),
    ({"LR_DECAY_STYLE": "constant"}, "--lr-decay-style", "constant"),
    ({"LR_WARMUP_FRAC": "0.01"}, "--lr-warmup-fraction", "0.01"),
    ({"LR_WARMUP_FRACTION": "0.01"}, "--lr-warmup-fraction", "0.01"),
    ({"LR_WARMUP_FRAC": "0.0", "LR_WARMUP_FRACTION": "0.0"}, "--lr-warmup-fraction", "0.0"),
    ({"LR_DECAY_ITERS": "1234"}, "--lr-decay-iters", "1234"),
    ({"WEIGHT_DECAY": "0.05"}, "--weight-decay", "0.05"),
    ({"ADAM_BETA1": "0.8"}, "--adam-beta1", "0.8"),
    ({"ADAM_BETA2": "0.99"}, "--adam-beta2", "0.99"),
    ({"ADAM_EPS": "1e-8"}, "--adam-eps", "1e-8"),
    ({"CLIP_GRAD": "0.5"}, "--clip-grad", "0.5"),
    ({"ZERO_STAGE": "2"}, "--zero-stage", "2"),
    ({"DTYPE": "bf16", "GRAD_ACCUM_DTYPE": "bf16"}, "--grad-accum-dtype", "bf16"),
    ({"MICRO_BATCH": "4"}, "--micro-batch-size", "4"),
    ({"MICRO_BATCH": "4", "GRAD_ACC_STEPS": "3"}, "--global-batch-size", "12"),
    ({"GLOBAL_BATCH": "6", "GRAD_ACC_STEPS": "6"}, "--global-batch-size", "6"),
    ({"TRAIN_ITERS": "77"}, "--train-iters", "77"),
    ({"TRAIN_ITER": "77"}, "--train-iters", "77"),
    ({"TRAIN_TOKENS": "8192000", "SEQ": "1024", "MICRO_BATCH": "4"}, "--train-iters", "2000"),
    ({"USE_ACTIVATION_CHECKPOINTING": "1"}, "--checkpoint-num-layers", "1"),
    ({"USE_ACTIVATION_CHECKPOINTING": "true", "ACT_CKPT_NUM_LAYERS": "3"}, "--checkpoint-num-layers", "3"),
    ({"USE_ACTIVATION_CHECKPOINTING": "1"}, "--checkpoint-activations", None),
    ({"USE_ACTIVATION_CHECKPOINTING": "1"}, "--deepspeed-activation-checkpointing", None),
    ({"TIMING_LOG_LEVEL": "2"}, "--timing-log-level", "2"),
    ({"LOG_INTERVAL": "5"}, "--log-interval", "5"),
    ({"EVAL_INTERVAL": "7"}, "--eval-interval", "7"),
    ({"EVAL_ITERS": "3"}, "--eval-iters", "3"),
    ({"SAVE_INTERVAL": "9"}, "--save-interval", "9"),
    ({"TRAIN_SPLIT": "980", "VAL_SPLIT": "15", "TEST_SPLIT": "5"}, "--split", "980,15,5"),
    ({"ROPE_THETA": "500000"}, "--rotary-position-embeddings-theta", "500000"),
    ({"LOAD": "/ckpt/in"}, "--load", "/ckpt/in"),
    ({"SAVE": "/ckpt/out"}, "--save", "/ckpt/out"),
    ({"CKPT_DIR": "/ckpt/run"}, "--save", "/ckpt/run"),
    ({"CKPT_DIR": "/ckpt/run"}, "--load", "/ckpt/run"),
    ({"CKPT_DIR": "/ckpt/run"}, "--tensorboard-dir", "/ckpt/run/tensorboard"),
    ({"CKPT_DIR": "/ckpt/run"}, "--data-cache-path", "/ckpt/run/.cache/books/index-cache"),
    ({"TOKENIZER_TYPE": "Llama2Tokenizer"}, "--tokenizer-type", "Llama2Tokenizer"),
    ({"TOKENIZER_MODEL": "meta/llama"}, "--tokenizer-model", "meta/llama"),
    ({"INIT_METHOD_STD": "0.02"}, "--init-method-std", "0.02"),
    ({"MODEL_ARCH": "tiny"}, "--hidden-size", "64"),
]


@pytest.mark.parametrize("extra,flag,value", ENV_FLAG_CASES,
                         ids=[f"{'+'.join(e)}->{f}" for e, f, _ in ENV_FLAG_CASES])
def test_env_var_sets_flag(env, extra, flag, value):
    d = dry({**env, **extra})
    if value is None:
        assert d.has(flag)
    else:
        assert d.last(flag) == value
        assert d.count(flag) == 1


CPUINFO = {name: str(ROOT / "tests" / "assets" / f"cpuinfo-{name}.txt") for name in ("avx2", "avx512-bf16", "arm-bf16")}
CPU_DTYPE_CASES = [
    # (cpuinfo, settings, DTYPE chosen, the reason's words)
    ("avx2", {}, "fp32", "automatic: this CPU has no native bf16"),
    ("avx512-bf16", {}, "bf16", "automatic: this CPU has native bf16 (avx512_bf16), faster than fp32"),
    ("arm-bf16", {}, "bf16", "automatic: this CPU has native bf16 (bf16)"),
    ("missing", {}, "fp32", "automatic: this CPU has no native bf16"),
    # bf16 at stage 0 is refused with several micro-batches or replicas (megatron/arguments.py): fp32 instead
    ("avx512-bf16", {"ZERO_STAGE": "0", "GRAD_ACC_STEPS": "2"}, "fp32", "but bf16 at ZERO_STAGE=0 needs one replica"),
    ("avx512-bf16", {"ZERO_STAGE": "0", "NPROC": "2"}, "fp32", "but bf16 at ZERO_STAGE=0 needs one replica"),
    ("avx512-bf16", {"ZERO_STAGE": "0"}, "bf16", "automatic: this CPU has native bf16"),
    # ... which the trainer does not apply with pipeline parallelism
    ("avx512-bf16", {"ZERO_STAGE": "0", "PP": "2", "NPROC": "2", "GRAD_ACC_STEPS": "2"}, "bf16",
     "automatic: this CPU has native bf16"),
    ("avx512-bf16", {"DTYPE": "fp32"}, "fp32", "set by DTYPE"),
    ("avx2", {"DTYPE": "bf16"}, "bf16", "set by DTYPE"),
]


@pytest.mark.parametrize("cpu,extra,dtype,why", CPU_DTYPE_CASES,
                         ids=[f"{c}-{'+'.join(f'{k}={v}' for k, v in e.items()) or 'default'}"
                              for c, e, _, _ in CPU_DTYPE_CASES])
def test_cpu_dtype_follows_native_bf16(env, tmp_path, cpu, extra, dtype, why):
    """On a CPU, an unset DTYPE is bf16 where the CPU multiplies bf16 natively and fp32 elsewhere; the
    choice and its reason are printed (DRY_RUN, the start-up table and the end of the run)."""
    info = CPUINFO.get(cpu, str(tmp_path / "no-such-cpuinfo"))
    d = dry({**env, "ALCF_CPUINFO": info, "TRAIN_ITERS": "10", **extra})
    (line,) = [ln for ln in d.stdout.splitlines() if ln.startswith("# precision: ")]
    assert line.startswith(f"# precision: {dtype} (") and why in line, line
    assert d.has("--bf16") == (dtype == "bf16") and not d.has("--fp16")
    assert f"-{dtype}-opt" in d.last("--save") and d.last("--deepspeed_config").endswith(f"_{dtype}.json")
    assert d.config.get("bfloat16", {}).get("enabled", False) == (dtype == "bf16")


def test_accelerator_dtype_is_bf16_whatever_the_cpu(env, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100'\n")
    (bindir / "nvidia-smi").chmod(0o755)
    d = dry({**env, "ALCF_CPUINFO": CPUINFO["avx2"], "TRAIN_ITERS": "10", "PATH": f"{bindir}:{env['PATH']}",
             "BE": "gloo"})
    assert "# precision: bf16 (an accelerator is present)" in d.stdout and d.has("--bf16")


ABSENT_CASES = [
    # (settings where the flag is there, what removes it, flag)
    ({}, {"OVERRIDE_CKPT_OPT_PARAM": "1"}, "--use-checkpoint-opt_param-scheduler"),
    ({}, {"NO_LLAMA": "1"}, "--swiglu"),
    ({}, {"NO_LLAMA": "1"}, "--num-key-value-heads"),
    ({}, {"NO_TENSORBOARD": "1"}, "--tensorboard-dir"),
    ({"ALCF_HOSTNAME": AURORA_HOST}, {"NO_FLASH_ATTN": "1"}, "--use-flash-attn-builder"),
    ({"ALCF_HOSTNAME": POLARIS_HOST}, {"NO_FLASH_ATTN": "1"}, "--use-flash-attn-v2"),
    ({}, {"PP": "2", "NPROC": "2"}, "--no-pipeline-parallel"),
    ({"DTYPE": "bf16"}, {"DTYPE": "fp32"}, "--bf16"),
]


@pytest.mark.parametrize("base,extra,flag", ABSENT_CASES,
                         ids=[f"{'+'.join(e)}-no{f}" for _, e, f in ABSENT_CASES])
def test_env_var_removes_flag(env, base, extra, flag):
    assert dry({**env, **base}).has(flag)
    d = dry({**env, **base, **extra})
    assert not d.has(flag)
    if "NO_FLASH_ATTN" in extra:
        assert not d.last("--save").endswith("_flash")


def test_defaults_7b(env):
    d = dry(env)
    expect = {
        "--lr": "0.0002", "--lr-decay-style": "cosine", "--lr-warmup-fraction": "0.05",
        "--num-attention-heads": "32", "--num-layers": "32", "--hidden-size": "4096",
        "--num-key-value-heads": "8", "--ffn-hidden-size": "11008", "--seq-length": "4096",
        "--max-position-embeddings": "65536", "--tensor-model-parallel-size": "1",
        "--pipeline-model-parallel-size": "1", "--ds-sequence-parallel-size": "1",
        "--optimizer": "adamw", "--weight-decay": "0.1", "--adam-beta1": "0.9",
        "--adam-beta2": "0.95", "--adam-eps": "0.00001", "--clip-grad": "1.0", "--zero-stage": "1",
        "--micro-batch-size": "1", "--global-batch-size": "1", "--log-interval": "1",
        "--eval-interval": "100", "--eval-iters": "20", "--save-interval": "50", "--split": "990,10,0",
        "--rotary-position-embeddings-theta": "50000", "--timing-log-level": "1",
        "--tokenizer-type": "HFTokenizer", "--tokenizer-model": "google/gemma-7B",
        "--word-embedding-init-std": "0.632455532", "--hidden-dropout": "0", "--attention-dropout": "0",
        "--normalization": "rmsnorm",
        # 4,673,780,159,710 tokens // 4096 // 1
        "--train-iters": str(4673780159710 // 4096 // 1),
        "--deepspeed_config": "ds-configs/ds_stage1_mb1_gb1_pp1_fp32.json",
    }
    for flag, value in expect.items():
        assert d.last(flag) == value, flag
    for flag in ("--use-checkpoint-opt_param-scheduler", "--swiglu", "--deepspeed", "--no-pipeline-parallel",
                 "--accumulate-allreduce-grads-in-fp32", "--adjust-word-embedding-init",
                 "--shuffle-sample-in-corpus", "--untie-embeddings-and-output-weights",
                 "--log-timers-to-tensorboard", "--log-optimizer-states-to-tensorboard"):
        assert d.has(flag), flag
    # a CPU-only unknown machine: fp32 (no dtype flag), backend left to the Python side, no flash
    for flag in ("--bf16", "--fp16", "--distributed-backend", "--eval-on-start", "--min-lr") + tuple(
            f for f, _ in d.flags if f.startswith("--use-flash-attn")):
        assert not d.has(flag), flag
    assert math.isclose(float(d.last("--init-method-std")), math.sqrt(2 / (5 * 4096)), rel_tol=1e-9)
    name = "AuroraGPT-7B-ws1-ds-stage1-nl32-hs4096-mb1-seq4096-gb1-sp1-pp1-tp1-fp32-optadamw-lr0.0002-lwf0.05_ntok4673B"
    assert d.last("--save") == d.last("--load") == f"checkpoints/{name}"
    assert d.last("--data-cache-path") == f"checkpoints/{name}/.cache/books/index-cache"
    assert d.last("--tensorboard-dir") == f"checkpoints/{name}/tensorboard"
    assert d.argv[0].endswith("python") and d.argv[1] == str(ROOT / "pretrain_gpt.py")
    # every launcher flag comes once (user args may repeat them later)
    counts = {}
    for f, _ in d.flags:
        counts[f] = counts.get(f, 0) + 1
    assert {f: c for f, c in counts.items() if c > 1} == {}


@pytest.mark.parametrize("hidden", [64, 2048, 3072, 4096, 8192])
def test_init_method_std_exact(env, hidden):
    d = dry({**env, "HIDDEN": str(hidden), "HEADS": "32" if hidden % 32 == 0 else "4"})
    v = float(d.last("--init-method-std"))
    assert math.isclose(v, math.sqrt(2 / (5 * hidden)), rel_tol=1e-9)  # not bc's truncated 0.009848


# ------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------
PRESETS = {
    # name: (heads, layers, hidden, kv, ffn, seq, run-name prefix)
    "7B": (32, 32, 4096, 8, 11008, 4096, "AuroraGPT-7B"),
    "llama-3.1-7b": (32, 32, 4096, 8, 11008, 4096, "AuroraGPT-7B"),
    "2B": (16, 12, 2048, 4, 11008, 8192, "AuroraGPT-2B"),
    "aurora_gpt_2b": (16, 12, 2048, 4, 11008, 8192, "AuroraGPT-2B"),
    "llama3-3B": (24, 28, 3072, 8, 8192, 8192, "llama3-3B-nLayers28"),
    "smollm3-3B": (16, 24, 2048, 4, 11008, 8192, "smollm3-nLayers24"),
    "phi4_mini": (32, 24, 3072, 8, 8192, 8192, "phi4-mini-nLayers24"),
    "70B": (64, 80, 8192, 8, 28672, 8192, "AuroraGPT-70B"),
    "tiny": (4, 2, 64, 2, 192, 64, "tiny"),
    "7M": (4, 4, 256, 2, 704, 256, "7M"),
    "demo": (4, 2, 192, 2, 512, 256, "demo"),
    "30M": (8, 6, 512, 4, 1408, 512, "30M"),
}


@pytest.mark.parametrize("arch", list(PRESETS))
def test_presets(env, arch):
    heads, layers, hidden, kv, ffn, seq, prefix = PRESETS[arch]
    d = dry({**env, "MODEL_ARCH": arch, "TRAIN_ITERS": "10"})
    got = tuple(int(d.last(f)) for f in ("--num-attention-heads", "--num-layers", "--hidden-size",
                                         "--num-key-value-heads", "--ffn-hidden-size", "--seq-length"))
    assert got == (heads, layers, hidden, kv, ffn, seq)
    assert d.last("--max-position-embeddings") == str(16 * seq)
    assert d.last("--save").startswith(f"checkpoints/{prefix}-ws1-")


def test_preset_33b_forces_parallelism(env):
    d = dry({**env, "MODEL_ARCH": "33B", "NPROC": "12", "TP": "1", "ZERO_STAGE": "1", "MICRO_BATCH": "4",
             "GRAD_ACC_STEPS": "8", "TRAIN_ITERS": "10"})
    assert [d.last(f) for f in ("--tensor-model-parallel-size", "--zero-stage", "--micro-batch-size",
                                "--num-layers", "--hidden-size", "--num-attention-heads")] == \
        ["6", "2", "1", "78", "8268", "78"]
    assert d.last("--global-batch-size") == "2"  # 12 * 1 * 1 / 6
    assert "fixes TP=6" in d.stderr


def test_overridable_vs_fixed_presets(env):
    assert dry({**env, "MODEL_ARCH": "7B", "HIDDEN": "1024"}).last("--hidden-size") == "1024"
    assert dry({**env, "MODEL_ARCH": "tiny", "HIDDEN": "128"}).last("--hidden-size") == "128"
    d = dry({**env, "MODEL_ARCH": "2B", "HIDDEN": "1024"})
    assert d.last("--hidden-size") == "2048" and "ignoring HIDDEN=1024" in d.stderr
    d = dry({**env, "MODEL_ARCH": "llama3-3B", "NLAYERS": "10", "HIDDEN": "1024"})
    assert (d.last("--num-layers"), d.last("--hidden-size")) == ("10", "3072")
    assert "/llama3-3B-nLayers10-ws1-" in "/" + d.last("--save").split("/", 1)[1]


SHAPE = {"HEADS": "6", "NLAYERS": "3", "HIDDEN": "96", "NUM_KV_HEAD": "2", "FFN_HIDDEN_SIZE": "200", "SEQ": "48"}


def test_unknown_model_arch_is_refused_before_anything_is_written(wd):
    # a real run (not DRY_RUN), outside the demo: refused in the launcher's checks, nothing created
    e = base_env(WORKING_DIR=str(wd), DATA_FILE_LIST=str(wd / "lists" / "books.txt"), MODEL_ARCH="nosucharch",
                 HIDDEN="64")
    before = sorted(p.relative_to(wd) for p in wd.rglob("*"))
    p = run(e, dry_run=False)
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("ERROR")]
    # one line: the name, every preset, and the shape variables still missing (HIDDEN was given)
    assert errors == ["ERROR: unknown MODEL_ARCH='nosucharch'; use a preset (tiny 7M demo 30M 2B 7B 33B 70B "
                      "llama3-3B smollm3-3B phi4-mini), or for a custom shape also set HEADS NLAYERS "
                      "NUM_KV_HEAD FFN_HIDDEN_SIZE SEQ"]
    assert sorted(p.relative_to(wd) for p in wd.rglob("*")) == before
    # in the demo too (no DATA_FILE_LIST): the demo's 7M default does not replace a typo either
    p = run(base_env(WORKING_DIR=str(wd), MODEL_ARCH="7m_typo"), dry_run=False)
    assert p.returncode == 2 and "unknown MODEL_ARCH='7m_typo'" in p.stderr
    assert sorted(p.relative_to(wd) for p in wd.rglob("*")) == before


def test_model_arch_unset_or_empty_is_the_7b_preset(env):
    for e in (env, {**env, "MODEL_ARCH": ""}):
        d = dry(e)
        assert [d.last(f) for f in ("--num-layers", "--hidden-size", "--seq-length")] == ["32", "4096", "4096"]
        assert d.last("--save").startswith("checkpoints/AuroraGPT-7B-ws1-")


def test_custom_model_arch_with_every_shape_variable(env):
    d = dry({**env, "MODEL_ARCH": "custom", **SHAPE})
    got = [d.last(f) for f in ("--num-attention-heads", "--num-layers", "--hidden-size", "--num-key-value-heads",
                               "--ffn-hidden-size", "--seq-length", "--max-position-embeddings")]
    assert got == ["6", "3", "96", "2", "200", "48", str(16 * 48)]
    assert d.last("--save").startswith("checkpoints/custom-ws1-ds-stage1-nl3-hs96-")
    assert "WARNING" not in d.stderr
    # any name works the same way, with the aliases of the shape variables
    alias = {**SHAPE, "NHEADS": SHAPE["HEADS"], "NUM_LAYERS": SHAPE["NLAYERS"], "SEQ_LEN": SHAPE["SEQ"]}
    for k in ("HEADS", "NLAYERS", "SEQ"):
        del alias[k]
    d = dry({**env, "MODEL_ARCH": "my-model_v2.1", **alias})
    assert d.last("--save").startswith("checkpoints/my-model_v2.1-ws1-") and d.last("--num-layers") == "3"
    # one missing variable is named; a name that cannot be a directory name is refused
    p = run({**env, "MODEL_ARCH": "custom", **{k: v for k, v in SHAPE.items() if k != "NUM_KV_HEAD"}})
    assert p.returncode == 2 and p.stderr.count("ERROR") == 1
    assert "custom shape also set NUM_KV_HEAD\n" in p.stderr
    p = run({**env, "MODEL_ARCH": "a/b", **SHAPE})
    assert p.returncode == 2 and "MODEL_ARCH='a/b' cannot name a run" in p.stderr


# ------------------------------------------------------------------------------------------------
# user arguments come last and win
# ------------------------------------------------------------------------------------------------
def test_user_args_override_launcher_defaults(env):
    user = ["--init-method-std", "0.5", "--seq-length", "99", "--optimizer", "sgd", "--clip-grad=3.0",
            "--lr_constant_plus_cooldown", "--lr_constant_plus_cooldown_frac", "0.01"]
    d = dry(env, user)
    assert d.argv[-len(user):] == user  # verbatim, at the very end
    assert d.last("--init-method-std") == "0.5"
    assert d.last("--seq-length") == "99"
    assert d.last("--optimizer") == "sgd"
    assert d.last("--clip-grad") == "3.0"
    assert d.last("--lr_constant_plus_cooldown_frac") == "0.01"
    assert d.has("--lr_constant_plus_cooldown")
    # the launcher's own value is still there, earlier
    assert d.count("--seq-length") == 2 and d.flags.index(("--seq-length", "4096")) < d.flags.index(
        ("--seq-length", "99"))


def test_value_with_spaces_stays_one_argument(env):
    d = dry(env, ["--wandb-exp-name", "my run  (two spaces)", "--kill-switch-file", "it's here"])
    assert d.last("--wandb-exp-name") == "my run  (two spaces)"
    assert d.last("--kill-switch-file") == "it's here"
    assert ["--wandb-exp-name", "my run  (two spaces)"] in d.lines  # flag and value on one line


def test_one_flag_per_line(env):
    d = dry(env, ["--finetune", "--universal-checkpoint"])
    for tokens in d.lines[2:]:
        assert tokens[0].startswith("-")
        assert len(tokens) in (1, 2)
        if len(tokens) == 2:
            assert "=" not in tokens[0]
    assert ["--lr", "0.0002"] in d.lines and ["--seq-length=4096"] in d.lines
    assert d.lines[-2:] == [["--finetune"], ["--universal-checkpoint"]]


# ------------------------------------------------------------------------------------------------
# arithmetic
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", ["22000000000", "22e9", "2.2e10"])
def test_train_tokens_to_iters(env, tokens):
    d = dry({**env, "TRAIN_TOKENS": tokens, "SEQ": "4096", "MICRO_BATCH": "4", "GRAD_ACC_STEPS": "192"})
    assert d.last("--global-batch-size") == "768"
    assert d.last("--train-iters") == str(22_000_000_000 // 4096 // 768) == "6993"
    assert "_ntok22B" in d.last("--save")


def test_train_tokens_win_over_iters(env):
    d = dry({**env, "TRAIN_TOKENS": "4096000", "TRAIN_ITERS": "5", "SEQ": "4096"})
    assert d.last("--train-iters") == "1000"
    assert "TRAIN_ITERS=5 ignored" in d.stderr


@pytest.mark.parametrize("nproc,tp,pp,sp,mb,gas,gbs", [
    (1, 1, 1, 1, 1, 1, 1),
    (8, 1, 1, 1, 2, 3, 48),
    (8, 2, 2, 1, 2, 3, 12),
    (8, 2, 1, 2, 1, 4, 8),
    (6, 3, 1, 1, 5, 1, 10),
])
def test_global_batch_arithmetic(env, nproc, tp, pp, sp, mb, gas, gbs):
    d = dry({**env, "NPROC": nproc, "TP": tp, "PP": pp, "SP": sp, "MICRO_BATCH": mb, "GRAD_ACC_STEPS": gas,
             "TRAIN_ITERS": "10"})
    assert d.last("--global-batch-size") == str(gbs)
    assert d.config["train_batch_size"] == gbs
    assert d.config["train_micro_batch_size_per_gpu"] == mb
    assert d.config["gradient_accumulation_steps"] == gas
    assert d.last("--deepspeed_config") == f"ds-configs/ds_stage1_mb{mb}_gb{gbs}_pp{pp}_fp32.json"
    assert f"-ws{nproc}-" in d.last("--save") and f"-gb{gbs}-" in d.last("--save")


def test_global_batch_given_consistent(env):
    d = dry({**env, "NPROC": "4", "MICRO_BATCH": "2", "GRAD_ACC_STEPS": "3", "GLOBAL_BATCH": "24"})
    assert d.last("--global-batch-size") == "24"


# ------------------------------------------------------------------------------------------------
# machines and jobs
# ------------------------------------------------------------------------------------------------
def test_pbs_aurora_launch(env, tmp_path):
    hf = hostfile(tmp_path, 2)
    d = dry({**env, "ALCF_HOSTNAME": AURORA_HOST + ".hostmgmt.cm.aurora", "PBS_NODEFILE": hf,
             "NGPU_PER_HOST": "12", "TRAIN_ITERS": "10"})
    assert d.lines[0][0].endswith("mpiexec")
    assert d.lines[1:6] == [["--envall"], ["-n", "24"], ["-ppn", "12"], ["--hostfile", str(hf)],
                            ["--cpu-bind=list:2-4:10-12:18-20:26-28:34-36:42-44:54-56:62-64:70-72:78-80:86-88:94-96"]]
    assert d.lines[6][0].endswith("python") and d.lines[7] == [str(ROOT / "pretrain_gpt.py")]
    assert d.last("--distributed-backend") == "ccl"
    assert d.has("--use-flash-attn-builder") and d.has("--bf16")
    assert d.last("--global-batch-size") == str(24 * 16)  # 2 nodes -> GAS 16
    assert d.config["bfloat16"] == {"enabled": True}
    assert d.last("--save").endswith("_flash") and "-ws24-" in d.last("--save")
    assert "# demo" not in d.stdout  # a job is never the demo


def test_pbs_default_gpus_per_host_on_aurora(env, tmp_path):
    d = dry({**env, "ALCF_HOSTNAME": AURORA_HOST, "HOSTFILE": hostfile(tmp_path, 3), "TRAIN_ITERS": "10"})
    assert ["-n", "36"] in d.lines and ["-ppn", "12"] in d.lines


def test_pbs_polaris_and_cpu_bind(env, tmp_path):
    hf = hostfile(tmp_path, 3, "x3005c0s")
    d = dry({**env, "ALCF_HOSTNAME": POLARIS_HOST, "PBS_NODEFILE": hf, "NGPU_PER_HOST": "4", "TRAIN_ITERS": "10"})
    assert ["-n", "12"] in d.lines and ["-ppn", "4"] in d.lines
    assert ["--cpu-bind=depth"] in d.lines and any(t[0] == "-d" and int(t[1]) >= 1 for t in d.lines)
    # fp16 as upstream (DeepSpeed's loss scaling; tests/test_fp16.py trains this default on CPU)
    assert d.last("--distributed-backend") == "nccl" and d.has("--fp16") and d.has("--use-flash-attn-v2")
    assert not d.has("--bf16")
    assert d.last("--micro-batch-size") == "2"  # 3-7 nodes
    assert d.config["gradient_accumulation_steps"] == 8
    assert d.config["fp16"]["enabled"] is True and d.config["communication_data_type"] == "fp32"
    d = dry({**env, "ALCF_HOSTNAME": POLARIS_HOST, "PBS_NODEFILE": hf, "NGPU_PER_HOST": "4",
             "CPU_BIND": "list:0-7:8-15:16-23:24-31", "NCCL": "mynccl", "TRAIN_ITERS": "10"})
    assert ["--cpu-bind=list:0-7:8-15:16-23:24-31"] in d.lines and ["--cpu-bind=depth"] not in d.lines
    assert d.last("--distributed-backend") == "mynccl"


@pytest.mark.parametrize("host,machine_flags", [
    ("x1921c0s0b0n0", ("ccl", "--use-flash-attn-builder")),  # sunspot
    ("uan-0001", ("ccl", "--use-flash-attn-builder")),  # sunspot
    ("sophia-gpu-01", ("nccl", "--use-flash-attn-v2")),
    ("nid001234", ("nccl", "--use-flash-attn-v2")),  # perlmutter
])
def test_machine_detection(env, host, machine_flags):
    d = dry({**env, "ALCF_HOSTNAME": host, "NPROC": "2", "TRAIN_ITERS": "10"})
    assert d.last("--distributed-backend") == machine_flags[0] and d.has(machine_flags[1])
    if host.startswith("nid"):
        assert d.last("--tensor-model-parallel-size") == "2"


@pytest.mark.parametrize("nodes,gas", [(1, 16), (15, 16), (16, 8), (32, 8), (33, 4), (127, 4), (128, 2),
                                       (255, 2), (256, 1), (300, 1)])
def test_aurora_grad_acc_table(env, tmp_path, nodes, gas):
    d = dry({**env, "ALCF_HOSTNAME": AURORA_HOST, "PBS_NODEFILE": hostfile(tmp_path, nodes),
             "NGPU_PER_HOST": "1", "TRAIN_ITERS": "10"})
    assert d.config["gradient_accumulation_steps"] == gas
    assert d.last("--global-batch-size") == str(nodes * gas)


def test_unknown_machine_gets_generic_defaults(env):
    d = dry({**env, "ALCF_HOSTNAME": "mylaptop", "NPROC": "2"})
    assert d.last("--tensor-model-parallel-size") == "1"
    assert not d.has("--distributed-backend")
    assert "generic" in d.stdout


# ------------------------------------------------------------------------------------------------
# local launchers
# ------------------------------------------------------------------------------------------------
def test_local_single_process_is_plain_python(env):
    d = dry({**env, "NPROC": "1", "LAUNCHER": "mpiexec"})
    assert len(d.lines[0]) == 1 and d.lines[0][0].endswith("python")
    assert d.lines[1] == [str(ROOT / "pretrain_gpt.py")]


def test_local_torchrun(env):
    d = dry({**env, "NPROC": "2", "MASTER_PORT": "23456"})
    assert d.lines[:6] == [[d.lines[0][0]], ["-m", "torch.distributed.run"], ["--nproc_per_node", "2"],
                           ["--master_addr", "127.0.0.1"], ["--master_port", "23456"],
                           [str(ROOT / "pretrain_gpt.py")]]
    assert d.lines[0][0].endswith("python")


def test_local_torchrun_free_port(env):
    d = dry({**env, "NPROC": "2", "LAUNCHER": "torchrun"})
    port = int(dict(t for t in d.lines if len(t) == 2)["--master_port"])
    low, _ = ephemeral_port_range()  # launch_env.free_port: not from the range outgoing connections use
    assert 10000 <= port < low if low > 11000 else 1024 <= port <= 65535


def test_local_mpiexec(env):
    d = dry({**env, "NPROC": "2", "LAUNCHER": "mpiexec", "MASTER_PORT": "23457"})
    assert d.lines[0][0].endswith("/mpiexec") and Path(d.lines[0][0]).parent == Path(d.lines[2][0]).parent
    assert d.lines[1] == ["-n", "2"] and d.lines[3] == [str(ROOT / "pretrain_gpt.py")]
    envline = next(l for l in d.stdout.splitlines() if l.startswith("# environment:"))
    assert "MASTER_ADDR=127.0.0.1" in envline and "MASTER_PORT=23457" in envline
    assert re.search(r"OMP_NUM_THREADS=\d+", envline)


def test_omp_num_threads(env):
    cores = len(os.sched_getaffinity(0))
    assert f"OMP_NUM_THREADS={max(1, cores // 2)}" in dry({**env, "NPROC": "2"}).stdout
    assert f"OMP_NUM_THREADS={max(1, cores // 64)}" in dry({**env, "NPROC": "64", "TRAIN_ITERS": "1"}).stdout
    assert "OMP_NUM_THREADS=3" in dry({**env, "NPROC": "2", "OMP_NUM_THREADS": "3"}).stdout


def test_slurm_job(env):
    d = dry({**env, "SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "NGPU_PER_HOST": "4", "TRAIN_ITERS": "10",
             "SLURM_SUBMIT_DIR": "/nonexistent-but-overridden"})
    assert d.lines[:4] == [["srun"], ["-u"], ["-N", "2"], ["-n", "8"]]
    assert d.last("--global-batch-size") == "8"


def test_pbs_world_size_env_overrides_count(env, tmp_path):
    d = dry({**env, "ALCF_HOSTNAME": AURORA_HOST, "PBS_NODEFILE": hostfile(tmp_path, 2), "WORLD_SIZE": "12",
             "TRAIN_ITERS": "10"})
    assert ["-n", "12"] in d.lines and ["-ppn", "12"] in d.lines and "-ws12-" in d.last("--save")


def test_working_dir_from_pbs(env, tmp_path):
    wdir = tmp_path / "submit"
    wdir.mkdir()
    e = {k: v for k, v in env.items() if k != "WORKING_DIR"}
    d = dry({**e, "PBS_O_WORKDIR": wdir, "PBS_NODEFILE": hostfile(tmp_path, 1), "TRAIN_ITERS": "1"})
    assert d.rc == 0 and d.last("--save").startswith("checkpoints/")  # relative to PBS_O_WORKDIR, where it runs
    p = run({**e, "PBS_O_WORKDIR": tmp_path / "missing", "PBS_NODEFILE": hostfile(tmp_path, 1)})
    assert p.returncode == 2 and "ERROR: WORKING_DIR=" in p.stderr


# ------------------------------------------------------------------------------------------------
# run name
# ------------------------------------------------------------------------------------------------
def test_run_name_format(env):
    d = dry({**env, "MODEL_ARCH": "tiny", "NPROC": "2", "TRAIN_ITERS": "10"})
    assert d.last("--save") == \
        "checkpoints/tiny-ws2-ds-stage1-nl2-hs64-mb1-seq64-gb2-sp1-pp1-tp1-fp32-optadamw-lr0.0002-lwf0.05_ntok0B"
    d = dry({**env, "MODEL_ARCH": "tiny", "TRAIN_TOKENS": "5e9", "TOKENIZER_TYPE": "SentencePieceTokenizer",
             "TOKENIZER_MODEL": "org/tok.model", "LR_DECAY_ITERS": "100", "ALCF_HOSTNAME": AURORA_HOST,
             "NPROC": "1", "OPT": "muon", "LR": "0.001", "LR_WARMUP_FRAC": "0.01", "ZERO_STAGE": "2"})
    assert d.last("--save") == ("checkpoints/tiny-ws1-ds-stage2-nl2-hs64-mb1-seq64-gb16-sp1-pp1-tp1-bf16-optmuon"
                                "-lr0.001-lwf0.01_ntok5B_tokSentencePiece_tmorg_tok.model_ldi100_flash")
    assert re.search(r"^# run name: tiny-ws1-ds-stage2-", d.stdout, re.M)


# ------------------------------------------------------------------------------------------------
# DeepSpeed config
# ------------------------------------------------------------------------------------------------
COMMON_DS = {"steps_per_print": 1, "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
             "wall_clock_breakdown": False}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_ds_config(env, stage, dtype):
    d = dry({**env, "ZERO_STAGE": stage, "DTYPE": dtype, "MICRO_BATCH": "2", "GRAD_ACC_STEPS": "4"})
    c = d.config
    assert d.last("--deepspeed_config") == f"ds-configs/ds_stage{stage}_mb2_gb8_pp1_{dtype}.json"
    assert {k: c[k] for k in COMMON_DS} == COMMON_DS
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (8, 2, 4)
    assert c["gradient_clipping"] == 1.0
    assert c["flops_profiler"] == {"enabled": False, "profile_step": 2, "module_depth": -1, "top_modules": 1,
                                   "detailed": True, "output_file": None}
    assert c["zero_optimization"]["stage"] == stage
    if dtype == "bf16":
        assert c["bfloat16"] == {"enabled": True}
        assert c["fp16"] == {"enabled": False, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2,
                             "min_loss_scale": 1}
        assert "communication_data_type" not in c and d.has("--bf16")
    elif dtype == "fp16":
        assert c["communication_data_type"] == "fp32"  # reduced in fp32 (the trainer does so for bf16 too)
        assert c["fp16"] == {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2,
                             "min_loss_scale": 1}
        assert c["bfloat16"] == {"enabled": False, "loss_scale": 1.0} and d.has("--fp16")
    else:
        assert c["communication_data_type"] == "fp32"
        assert "fp16" not in c and "bfloat16" not in c
        assert not d.has("--bf16") and not d.has("--fp16")
    if stage == 3:
        z = c["zero_optimization"]
        assert z["zero_hpz_partition_size"] == 1 and z["reduce_scatter"] is False
        assert z["stage3_max_live_parameters"] == 3e9 and z["stage3_param_persistence_threshold"] == 1e5
        assert z["reduce_bucket_size"] == 90000000 and z["sub_group_size"] == 1e9
        assert z["offload_optimizer"] == {"device": "none", "buffer_count": 4, "pipeline_read": False,
                                          "pipeline_write": False, "pin_memory": True}
        assert "comms_logger" not in c
    else:
        assert c["zero_optimization"] == {"stage": stage}
        assert c["comms_logger"] == {"enabled": False, "verbose": False, "debug": False}
    assert "optimizer" not in c
    assert "Please add" not in d.stdout + d.stderr


def test_ds_config_options(env):
    c = dry({**env, "CLIP_GRAD": "0.3", "FLOPS_PROFILER": "1", "COMMS_LOGGER": "true"}).config
    assert c["gradient_clipping"] == 0.3 and c["flops_profiler"]["enabled"] is True
    assert c["comms_logger"]["enabled"] is True
    c = dry({**env, "ZERO_STAGE": "2", "CPU_OPTIMIZER": "1"}).config
    assert c["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    c = dry({**env, "ZERO_STAGE": "3", "ZERO_HPZ_PARTITION_SIZE": "4"}).config
    assert c["zero_optimization"]["zero_hpz_partition_size"] == 4
    c = dry({**env, "PP": "2", "NPROC": "2"}).config
    assert c["data_types"] == {"grad_accum_dtype": "fp32"}
    assert c["comms_logger"] == {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    c = dry({**env, "CLIP_GRAD": ".5"}).config  # made a valid JSON number
    assert c["gradient_clipping"] == 0.5


def test_ds_config_optimizer_blocks_are_valid_json(env):
    c = dry({**env, "OPT": "ds.adamw", "LR": "0.001", "ADAM_EPS": "1e-8"}).config
    assert c["optimizer"]["type"] == "AdamW"
    assert c["optimizer"]["params"]["lr"] == 0.001 and c["optimizer"]["params"]["betas"] == [0.9, 0.95]
    c = dry({**env, "OPT": "ds.onebitlamb", "BE": "gloo"}).config
    assert c["optimizer"]["type"] == "OneBitLamb" and c["optimizer"]["params"]["comm_backend_name"] == "gloo"


def test_ds_config_of_the_user(env):
    """An extra --deepspeed_config comes after the launcher's, so the trainer reads the user's file (the launcher
    still prints and writes its own); a DS_CONFIG variable is not read (the launcher sets it, as upstream)."""
    d = dry({**env, "DS_CONFIG": "/elsewhere/mine.json"}, ["--deepspeed_config", "my.json"])
    ours = "ds-configs/ds_stage1_mb1_gb1_pp1_fp32.json"
    assert [v for f, v in d.flags if f == "--deepspeed_config"] == [ours, "my.json"]
    assert d.last("--deepspeed_config") == "my.json" and f"# DeepSpeed config {ours}:" in d.stdout


def test_ds_config_before_any_python_environment(env, tmp_path):
    """DRY_RUN on a fresh checkout (no venv yet): python3 builds the config (megatron/deepspeed_config.py imports
    no torch); the command names the venv's python it will create. A python that cannot build it is named."""
    d = dry({**env, "VENV_DIR": str(tmp_path / "venv")})
    assert str(tmp_path / "venv" / "bin" / "python") in d.argv and d.config["train_batch_size"] == 1
    bad = tmp_path / "oldpython"
    bad.write_text("#!/bin/sh\necho 'SyntaxError: invalid syntax' >&2\nexit 1\n")
    bad.chmod(0o755)
    p = run({**env, "VIRTUAL_ENV": str(tmp_path), "PYTHON": str(bad)})
    assert p.returncode == 1 and "# command:" not in p.stdout
    assert p.stderr.strip().splitlines()[-1] == (
        f"ERROR: {bad} could not build the DeepSpeed config (megatron/deepspeed_config.py, see above); it needs "
        "Python >= 3.10: activate your environment or set PYTHON")


# ------------------------------------------------------------------------------------------------
# demo mode and the tokenizer next to the list
# ------------------------------------------------------------------------------------------------
def test_demo_mode(tmp_path):
    d = dry(base_env(WORKING_DIR=tmp_path))
    demo = tmp_path / ".cache" / "demo-data"
    assert f"# demo data list: {demo}/shakespeare.txt" in d.stdout
    assert d.last("--data-file-list") == f"{demo}/shakespeare.txt"
    assert d.last("--tokenizer-type") == "SentencePieceTokenizer"
    assert d.last("--tokenizer-model") == f"{demo}/tokenizer.model"
    expect = {"--train-iters": "580", "--micro-batch-size": "6", "--global-batch-size": "6", "--lr": "0.002",
              "--lr-warmup-fraction": "0.05", "--min-lr": "0.0001", "--eval-interval": "100", "--eval-iters": "13",
              "--save-interval": "200", "--log-interval": "10", "--zero-stage": "1", "--hidden-size": "192",
              "--num-layers": "2", "--ffn-hidden-size": "512", "--seq-length": "256", "--data-cache-path":
              "checkpoints/demo-ws1-ds-stage1-nl2-hs192-mb6-seq256-gb6-sp1-pp1-tp1-fp32-optadamw-lr0.002-lwf0.05"
              "_ntok0B/.cache/shakespeare/index-cache"}
    for flag, value in expect.items():
        assert d.last(flag) == value, flag
    assert d.flags[-1] == ("--eval-on-start", None)
    assert "demo run" in d.stderr and "DATA_FILE_LIST=" in d.stderr
    assert "shipped next to the data list" in d.stderr
    assert list(tmp_path.iterdir()) == []  # DRY_RUN wrote nothing


def test_demo_respects_user_settings(tmp_path):
    d = dry(base_env(WORKING_DIR=tmp_path, DEMO_DATA_DIR=tmp_path / "dd", MODEL_ARCH="tiny", LR="0.01",
                     TRAIN_ITER="20", LR_WARMUP_FRACTION="0.1", MICRO_BATCH="2", TOKENIZER_MODEL="other.model"),
            ["--eval-iters", "1"])
    assert d.last("--data-file-list") == f"{tmp_path}/dd/shakespeare.txt"
    assert (d.last("--hidden-size"), d.last("--lr"), d.last("--train-iters")) == ("64", "0.01", "20")
    assert (d.last("--lr-warmup-fraction"), d.last("--micro-batch-size")) == ("0.1", "2")
    assert d.last("--tokenizer-model") == "other.model" and d.last("--eval-iters") == "1"
    d = dry(base_env(WORKING_DIR=tmp_path, TRAIN_TOKENS="153600"))  # tokens decide: 153600 // 256 // 6
    assert d.last("--train-iters") == "100"


def test_job_without_data_list_is_an_error_not_the_demo(tmp_path):
    p = run(base_env(WORKING_DIR=tmp_path, PBS_NODEFILE=hostfile(tmp_path, 1), ALCF_HOSTNAME=AURORA_HOST))
    assert p.returncode == 2
    assert re.search(r"^ERROR: DATA_FILE_LIST is not set.*aurora/dolma\.txt", p.stderr, re.M)


def test_sidecar_tokenizer(env, wd):
    (wd / "lists" / "tokenizer.model").write_bytes(b"x")
    d = dry(env)
    assert d.last("--tokenizer-type") == "SentencePieceTokenizer"
    assert d.last("--tokenizer-model") == str(wd / "lists" / "tokenizer.model")
    assert "_tm" not in d.last("--save")
    d = dry({**env, "TOKENIZER_MODEL": "google/gemma-7B"})
    assert d.last("--tokenizer-model") == "google/gemma-7B" and d.last("--tokenizer-type") == "HFTokenizer"


def test_relative_data_list_resolved_from_cwd(env, wd):
    d = dry({**env, "DATA_FILE_LIST": "lists/books.txt"})  # run from the repo: found under WORKING_DIR
    assert d.last("--data-file-list") == str(wd / "lists" / "books.txt")
    p = run({**env, "DATA_FILE_LIST": "./books.txt", "WORKING_DIR": str(ROOT)}, cwd=wd / "lists")
    assert parse_dry(p).last("--data-file-list") == str(wd / "lists" / "books.txt")


# ------------------------------------------------------------------------------------------------
# validation: one line per problem, exit 2, nothing written
# ------------------------------------------------------------------------------------------------
ERROR_CASES = [
    ({"LR": "abc"}, "LR"),
    ({"LR": "1e"}, "LR"),
    ({"MIN_LR": "low"}, "MIN_LR"),
    ({"WEIGHT_DECAY": "0.1.2"}, "WEIGHT_DECAY"),
    ({"ADAM_BETA1": "x"}, "ADAM_BETA1"),
    ({"ADAM_BETA2": ""}, None),  # empty = unset = default: not an error
    ({"ADAM_EPS": "1e-"}, "ADAM_EPS"),
    ({"LR_WARMUP_FRAC": "1.5"}, "LR_WARMUP_FRAC"),
    ({"LR_WARMUP_FRACTION": "-0.1"}, "LR_WARMUP_FRAC"),
    ({"LR_WARMUP_FRAC": "abc"}, "LR_WARMUP_FRAC"),
    ({"LR_WARMUP_FRAC": "0.01", "LR_WARMUP_FRACTION": "0.02"}, "LR_WARMUP_FRACTION"),
    ({"SEQ": "128", "SEQ_LEN": "256"}, "SEQ_LEN"),
    ({"MICRO_BATCH": "0"}, "MICRO_BATCH"),
    ({"MICRO_BATCH": "2.5"}, "MICRO_BATCH"),
    ({"GRAD_ACC_STEPS": "-1"}, "GRAD_ACC_STEPS"),
    ({"TRAIN_ITERS": "ten"}, "TRAIN_ITERS"),
    ({"TRAIN_TOKENS": "1.5"}, "TRAIN_TOKENS"),
    ({"SEQ": "0"}, "SEQ"),
    ({"TP": "x"}, "TP"),
    ({"PP": "0"}, "PP"),
    ({"SP": "1.0"}, "SP"),
    ({"NPROC": "two"}, "NPROC"),
    ({"EVAL_INTERVAL": "0"}, "EVAL_INTERVAL"),
    ({"EVAL_ITERS": "-3"}, "EVAL_ITERS"),
    ({"SAVE_INTERVAL": "often"}, "SAVE_INTERVAL"),
    ({"ZERO_STAGE": "4"}, "ZERO_STAGE"),
    ({"ZERO_STAGE": "one"}, "ZERO_STAGE"),
    ({"TP": "2"}, "WORLD_SIZE"),
    ({"NPROC": "4", "TP": "2", "PP": "3"}, "WORLD_SIZE"),
    ({"GLOBAL_BATCH": "5"}, "GLOBAL_BATCH"),
    ({"NPROC": "2", "GLOBAL_BATCH": "8"}, "GRAD_ACC_STEPS=4"),
    ({"DATA_FILE_LIST": "/no/such/list.txt"}, "DATA_FILE_LIST"),
    ({"LAUNCHER": "srun"}, "LAUNCHER"),
    ({"DTYPE": "fp8"}, "DTYPE"),
    ({"TRAIN_TOKENS": "1000"}, "TRAIN_TOKENS"),
    ({"NUM_KV_HEAD": "5"}, "NUM_KV_HEAD"),
    ({"HEADS": "0"}, "HEADS"),
]


def _snapshot(path: Path) -> list:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("extra,name", ERROR_CASES, ids=[f"{'+'.join(f'{k}={v}' for k, v in e.items())}"
                                                         for e, _ in ERROR_CASES])
def test_invalid_settings(env, wd, extra, name):
    if name is None:
        assert dry({**env, **extra}).rc == 0
        return
    before = _snapshot(wd)
    # not a dry run: the checks must stop it before any set-up (EXEC would fail loudly if reached)
    p = run({**env, "TRAIN_ITERS": env.get("TRAIN_ITERS", "10"), **extra}, dry_run=False)
    assert p.returncode == 2, p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("ERROR:")]
    assert len(errors) == 1, p.stderr
    assert name in errors[0]
    assert p.stdout == ""
    assert _snapshot(wd) == before
    assert "[env]" not in p.stderr  # the Python environment was not touched


def test_all_problems_listed_together(env, wd):
    p = run({**env, "LR": "x", "MICRO_BATCH": "0", "ZERO_STAGE": "9", "DTYPE": "int4", "LAUNCHER": "x",
             "DATA_FILE_LIST": str(wd / "missing.txt")})
    errors = [l for l in p.stderr.splitlines() if l.startswith("ERROR:")]
    assert p.returncode == 2 and len(errors) == 6
    for name in ("LR=", "MICRO_BATCH", "ZERO_STAGE", "DTYPE", "LAUNCHER", "DATA_FILE_LIST"):
        assert sum(name in e for e in errors) >= 1, name


def test_missing_hostfile_is_an_error(env, tmp_path):
    p = run({**env, "PBS_NODEFILE": str(tmp_path / "nope")})
    assert p.returncode == 2 and "ERROR: HOSTFILE/PBS_NODEFILE" in p.stderr


def test_dry_run_is_fast_and_writes_nothing(tmp_path):
    """DRY_RUN sets up no environment (no venv, no pip: minutes) and writes nothing. The bound is far
    above the ~0.5 s it takes, so a loaded machine cannot miss it; that the DeepSpeed config it prints
    imports no torch is tests/test_deepspeed_config.py's."""
    import time
    t = time.perf_counter()
    p = run(base_env(WORKING_DIR=tmp_path))
    assert p.returncode == 0 and time.perf_counter() - t < 30.0
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# a real (non-dry) run with a stand-in trainer: array end to end, logs, .env, exit status
# ------------------------------------------------------------------------------------------------
FAKE_TRAINER = """\
import json, os, sys
json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "omp": os.environ.get("OMP_NUM_THREADS")},
          open(os.environ["FAKE_OUT"], "w"))
print("fake trainer ran")
sys.exit(3)
"""


def test_real_run_with_stand_in_trainer(env, wd, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    fake = out / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    e = {**env, "EXEC": str(fake), "FAKE_OUT": str(out / "argv.json"), "MODEL_ARCH": "tiny", "TRAIN_ITERS": "5",
         "PYTHON": sys.executable, "VIRTUAL_ENV": sys.prefix, "LS_COLORS": "di=01;34"}
    args = ["--wandb-exp-name", "two words", "--seq-length", "32"]
    d = dry(e, args)
    p = run(e, args, dry_run=False)
    assert p.returncode == 3, p.stdout + p.stderr  # the trainer's status
    got = json.loads((out / "argv.json").read_text())
    assert got["argv"] == d.argv[d.argv.index(str(fake)) + 1:]  # exactly what DRY_RUN showed
    assert got["argv"][-4:] == args and got["cwd"] == str(wd) and got["omp"] is not None
    name = d.last("--save").split("/", 1)[1]
    logs = list((wd / "logs" / name).glob("*/output.log"))
    assert len(logs) == 1
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}_1_{GENERIC_HOST}", logs[0].parent.name)
    log = logs[0].read_text()
    assert "fake trainer ran" in log and "TRAIN_ITERS" in log and str(logs[0]) in p.stdout
    dotenv = (wd / "checkpoints" / name / ".env").read_text()
    assert "FAKE_OUT=" in dotenv and "LS_COLORS" not in dotenv
    cfg = json.loads((wd / d.last("--deepspeed_config")).read_text())
    assert cfg == d.config
    assert (wd / "checkpoints" / name / "tensorboard").is_dir()
    assert (wd / "checkpoints" / name / ".cache" / "books" / "index-cache").is_dir()


# ------------------------------------------------------------------------------------------------
# every flag the launcher emits is accepted by the trainer's parser
# ------------------------------------------------------------------------------------------------
def _trainer_parser():
    try:
        from megatron.arguments import build_parser
    except Exception as e:  # the trainer is not importable in this environment
        pytest.skip(f"megatron.arguments not importable: {e}")
    return build_parser()


@pytest.mark.parametrize("case", ["default-7B", "demo", "aurora-job", "everything"])
def test_trainer_accepts_every_launcher_flag(env, tmp_path, case):
    extra = {
        "default-7B": {},
        "demo": {"DATA_FILE_LIST": ""},
        "aurora-job": {"ALCF_HOSTNAME": AURORA_HOST, "PBS_NODEFILE": str(hostfile(tmp_path, 2))},
        "everything": {"USE_ACTIVATION_CHECKPOINTING": "1", "LR_DECAY_ITERS": "10", "MIN_LR": "1e-5",
                       "DTYPE": "bf16", "BE": "gloo", "PP": "2", "NPROC": "2", "TRAIN_ITERS": "10"},
    }[case]
    d = dry({**env, **extra})
    script = next(n for n, t in enumerate(d.argv) if t.endswith(".py"))
    argv = d.argv[script + 1:]
    ns, unknown = _trainer_parser().parse_known_args(argv)
    assert unknown == []
    assert ns.seq_length == int(d.last("--seq-length")) and ns.lr == float(d.last("--lr"))
    assert ns.train_iters == int(d.last("--train-iters"))


def test_hydra_detection_reads_the_whole_version_under_pipefail(tmp_path):
    """MPICH's mpiexec is told from PALS by its --version. An mpiexec that goes on writing after the line
    naming HYDRA: piped into `grep -q`, the rest met a closed pipe (SIGPIPE, status 141), and under
    alcf_main's pipefail that read as "not hydra" (PALS' --cpu-bind then given to MPICH, which refuses it)."""
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/usr/bin/env bash\necho 'HYDRA build details:'\nsleep 0.3\n"
                    "for i in $(seq 200); do echo \"    option $i\"; done\n")
    fake.chmod(0o755)
    pals = tmp_path / "pals-mpiexec"
    pals.write_text("#!/usr/bin/env bash\necho 'mpiexec version 1.2 (PALS)'\n")
    pals.chmod(0o755)
    probe = (f"source {shlex.quote(str(ROOT / 'ALCF' / 'helpers.sh'))}; set -o pipefail; "
             f"for m in {shlex.quote(str(fake))} {shlex.quote(str(pals))} no-such-mpiexec; do "
             "_alcf_mpiexec_is_hydra \"$m\" && echo hydra || echo other; done")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["hydra", "other", "other"], out.stdout + out.stderr
