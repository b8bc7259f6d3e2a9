"""--compile / --no-compile and the automatic default (megatron/arguments.py::auto_compile,
megatron/training.py): compiled only where the run is long enough to pay for compiling (its model
compute, iterations x Megatron's FLOPs per iteration, >= AUTO_COMPILE_MIN_TFLOP), never where
--compile would be refused; the inductor cache is kept with the environment; the compile time is
reported. No test here compiles a model (that is what the automatic rule spares short runs)."""
from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from megatron.arguments import AUTO_COMPILE_MIN_TFLOP, ArgumentError, auto_compile, parse_args

ENV = {"WORLD_SIZE": "1"}


def _base(tmp_path, iters: int = 2) -> list[str]:
    data = tmp_path / "list.txt"
    data.write_text("1.0 prefix corpus\n")
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", str(iters), "--data-file-list", str(data)]


def test_compile_flags(tmp_path):
    assert parse_args(_base(tmp_path), env=ENV).compile is None  # automatic
    assert parse_args(_base(tmp_path) + ["--compile"], env=ENV).compile is True
    assert parse_args(_base(tmp_path) + ["--no-compile"], env=ENV).compile is False
    assert parse_args(_base(tmp_path) + ["--no-compile", "--zero-stage", "3"], env=ENV).compile is False
    with pytest.raises(ArgumentError, match="--compile is not supported with pipeline parallelism"):
        parse_args(_base(tmp_path) + ["--compile", "--pipeline-model-parallel-size", "2"], env={"WORLD_SIZE": "2"})


def _tflop_by_hand(iters: int) -> float:
    # 12·B·s·L·h²·(1 + f/h + kv/heads + s/h + V/(2·L·h)); B 1, s 32, L 2, h 64, f 4h (GELU), V 512
    return iters * 12 * 1 * 32 * 2 * 64**2 * (1 + 4 + 1 + 32 / 64 + 512 / (2 * 2 * 64)) / 1e12


@pytest.mark.skipif(torch.cuda.is_available() or not shutil.which(os.environ.get("CXX") or "g++"),
                    reason="the automatic rule compiles on CPU with a C++ compiler only")
def test_automatic_rule(tmp_path):
    short = parse_args(_base(tmp_path), env=ENV)
    short.padded_vocab_size = 512
    on, why = auto_compile(short)
    assert not on and f"{_tflop_by_hand(2):.3g} TFLOP < {AUTO_COMPILE_MIN_TFLOP:g}" in why and "--compile" in why

    iters = int(AUTO_COMPILE_MIN_TFLOP / _tflop_by_hand(1)) + 1  # just over the threshold
    long = parse_args(_base(tmp_path, iters), env=ENV)
    long.padded_vocab_size = 512
    on, why = auto_compile(long)
    assert on and f"{_tflop_by_hand(iters):.3g} TFLOP >= " in why and "--no-compile" in why
    long.train_iters = iters - 2
    assert not auto_compile(long)[0]

    for extra, reason in ((["--zero-stage", "3"], "a setting --compile does not support"),
                          (["--recompute-granularity", "full"], "a setting --compile does not support"),
                          (["--fp16", "--zero-stage", "1"], "fp16")):
        args = parse_args(_base(tmp_path, iters) + extra, env=ENV)
        args.padded_vocab_size = 512
        on, why = auto_compile(args)
        assert not on and reason in why, (extra, why)


def test_compile_cache_kept_with_the_environment(monkeypatch, tmp_path):
    from megatron.training import keep_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "given"))  # restored after the test
    assert keep_compile_cache() == str(tmp_path / "given")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    if os.access(sys.prefix, os.W_OK):
        assert keep_compile_cache() == os.path.join(sys.prefix, "torchinductor_cache")
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(sys.prefix, "torchinductor_cache")


def test_compile_report_counts_compile_seconds():
    from megatron.training import compile_report

    before = float(compile_report().split(" s ")[0])
    torch._dynamo.reset()
    f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="aot_eager")  # no C++ build: fast
    assert torch.equal(f(torch.ones(3)), torch.sin(torch.ones(3)) * 2 + 1)
    text = compile_report()
    assert float(text.split(" s ")[0]) > before and "FX graph cache" in text
