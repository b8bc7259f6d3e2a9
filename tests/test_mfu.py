"""megatron/observability/mfu.py: the Megatron FLOPs formula, the peak table, the matmul benchmark, MFU."""
from __future__ import annotations

import pytest
import torch

from megatron.config import Config, default_args
from megatron.observability.mfu import PeakFlops, flops_per_iteration, measure_matmul_tflops, resolve_peak, table_peak


def cfg(**kw):
    base = dict(global_batch_size=1, seq_length=4096, num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                padded_vocab_size=32000, swiglu=True, num_key_value_heads=8, num_attention_heads=32)
    base.update(kw)
    return Config.from_args(default_args(**base))


def test_flops_formula_against_hand_computed_values():
    # AuroraGPT-7B, one sequence: 12*4096*32*4096^2 * (1 + 11008/4096*1.5 + 8/32 + 4096/4096 + 32000/(2*32*4096))
    factor = 1 + 11008 / 4096 * 1.5 + 0.25 + 1.0 + 32000 / (2 * 32 * 4096)
    assert flops_per_iteration(cfg()) == pytest.approx(12 * 4096 * 32 * 4096**2 * factor, rel=1e-12)
    assert flops_per_iteration(cfg()) == pytest.approx(1.689726e14, rel=1e-6)  # 2.6388e13 * 6.40332
    # no swiglu, MHA: the classic GPT-3 form 72*B*s*L*h^2*(1 + s/(6h) + V/(12Lh))
    g = cfg(swiglu=False, ffn_hidden_size=4 * 4096, num_key_value_heads=32, global_batch_size=3)
    classic = 72 * 3 * 4096 * 32 * 4096**2 * (1 + 4096 / (6 * 4096) + 32000 / (12 * 32 * 4096))
    assert flops_per_iteration(g) == pytest.approx(classic, rel=1e-12)


def test_peak_table():
    assert table_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert table_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert table_peak("NVIDIA H100 PCIe", "bf16") == 756.0
    assert table_peak("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert table_peak("Intel(R) Data Center GPU Max 1550", "bf16", compute_units=448) == pytest.approx(298.2, abs=0.05)
    assert table_peak("Intel(R) Data Center GPU Max 1550", "bf16", compute_units=512) == pytest.approx(340.8, abs=0.05)
    assert table_peak("Some Future GPU", "bf16") is None


def test_flag_wins_and_cpu_peak_is_measured():
    assert resolve_peak(123.0, "cpu", "fp32") == PeakFlops(123.0, "--peak-tflops")
    p = resolve_peak(None, "cpu", "fp32", measure_seconds=0.1)
    assert p.source.startswith("measured: fp32")
    assert 1e-4 < p.tflops < 20  # a CPU core does 0.1 GFLOP/s .. a big server 20 TFLOP/s
    assert p.mfu(p.tflops / 4) == pytest.approx(0.25)


def test_matmul_benchmark_counts_two_n_cubed_flops(monkeypatch):
    """With time frozen except for one known advance, the reported rate is 2 n^3 * reps / seconds."""
    clock = iter([0.0, 0.0, 0.0] + [10.0] * 100)  # a warm-up matmul of 0 s, then the timed loop
    monkeypatch.setattr("megatron.observability.mfu.time.perf_counter", lambda: next(clock))
    got = measure_matmul_tflops(torch.float32, n=64, min_seconds=1.0)
    assert got == pytest.approx(2 * 64**3 * 4 / 10.0 / 1e12)  # stops after the first check (4 matmuls)


def test_a_matmul_slower_than_the_budget_is_the_measurement(monkeypatch):
    """fp16 on a CPU without native fp16 takes ~2 s per 1024^3 matmul: when a warm matmul (the one after the
    untimed warm-up) takes longer than `min_seconds`, it is the measurement (no loop after it)."""
    clock = iter([5.0, 9.0])  # the warm-up is not timed; the next matmul takes 4 s
    monkeypatch.setattr("megatron.observability.mfu.time.perf_counter", lambda: next(clock))
    calls = []
    monkeypatch.setattr("megatron.observability.mfu._synchronizer", lambda kind: lambda: calls.append(kind))
    assert measure_matmul_tflops(torch.float32, n=64, min_seconds=1.0) == pytest.approx(2 * 64**3 / 4.0 / 1e12)
    assert calls == ["cpu", "cpu"]  # two matmuls, each synchronized


def test_a_slow_first_matmul_alone_is_not_the_measurement(monkeypatch):
    """The first matmul of a process can be slow for reasons that do not repeat (thread pool start, kernel
    selection, a busy moment): a warm-up over the budget followed by a fast matmul goes on to the timed
    loop. (Taking the first call as the rate once reported a 54 GFLOP/s fp32 peak and an MFU of 111 %.)"""
    clock = iter([5.0, 5.01, 5.01] + [15.01] * 100)  # (warm-up untimed) a 0.01 s matmul, then the loop
    monkeypatch.setattr("megatron.observability.mfu.time.perf_counter", lambda: next(clock))
    assert measure_matmul_tflops(torch.float32, n=64, min_seconds=1.0) == pytest.approx(2 * 64**3 * 4 / 10.0 / 1e12)
