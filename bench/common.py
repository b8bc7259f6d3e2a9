"""Shared helpers of the benchmarks: single-rank process-group environment, synthetic corpora,
matmul peak, interleaved timing with medians, and the table printer.

Every benchmark measures a baseline in the same run as the thing it judges and reports the
ratio: on a shared machine the absolute numbers move with the load, the ratio much less,
because both sides are timed alternately (A, B, B, A, A, B, ...) and compared by medians.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python bench/x.py` from anywhere
    sys.path.insert(0, ROOT)

from megatron.launch_env import free_port  # noqa: E402,F401  (a child's MASTER_PORT, below the ephemeral range)


def llama_flags(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, seq: int, vocab: int) -> list[str]:
    """Trainer flags of a Llama-style model (SwiGLU, RMSNorm, RoPE, untied, no bias, no dropout) with a
    NullTokenizer vocabulary."""
    return ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
            "--num-key-value-heads", str(kv_heads), "--ffn-hidden-size", str(ffn), "--seq-length", str(seq),
            "--max-position-embeddings", str(seq), "--swiglu", "--normalization", "rmsnorm", "--disable-bias-linear",
            "--use-rotary-position-embeddings", "--untie-embeddings-and-output-weights", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab)]


def single_rank_env() -> None:
    """Make this process rank 0 of a world of 1 (in-process DeepSpeed engine)."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ[k] = v
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MEGATRON_NO_EZPZ", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def write_corpus(directory: str, n_tokens: int, vocab: int, seed: int = 0, doc_len: int = 2048) -> str:
    """A random-token .bin/.idx corpus of about `n_tokens` tokens and its data list; returns the list path."""
    import numpy as np

    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(directory, exist_ok=True)
    prefix = os.path.join(directory, "bench_text_document")
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab < 65500 else np.int32
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for _ in range(max(1, n_tokens // doc_len + 1)):
        builder.add_document(rng.integers(0, vocab - 1, doc_len).astype(dtype))
    builder.finalize(prefix + ".idx")
    path = os.path.join(directory, "bench.txt")
    with open(path, "w") as f:
        f.write(f"1.0 {prefix} bench\n")
    return path


def matmul_peak_tflops(dtype: str, n: int = 1024, seconds: float = 0.25) -> float:
    """Practical peak of this device: repeated n x n matmuls (2 n^3 FLOPs each), TFLOPS."""
    import torch

    from megatron.observability.mfu import measure_matmul_tflops

    return measure_matmul_tflops(torch.bfloat16 if dtype == "bf16" else torch.float32, n=n, min_seconds=seconds)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Interleaved:
    """Time several callables alternately: round r runs them in rotated order, so each sees the
    same share of the machine's load over the run. `samples[name]` holds seconds per call."""
    contenders: dict[str, Callable[[], object]]
    samples: dict[str, list[float]] = field(default_factory=dict)  # wall seconds per call
    cpu: dict[str, list[float]] = field(default_factory=dict)  # process CPU seconds (all threads) per call

    def run(self, rounds: int, warmup: int = 1, between: Callable[[], None] | None = None) -> None:
        names = list(self.contenders)
        for _ in range(warmup):
            for n in names:
                self.contenders[n]()
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            if r % 2:
                order = order[::-1]
            for n in order:
                c0, t0 = time.process_time(), time.perf_counter()
                self.contenders[n]()
                self.samples.setdefault(n, []).append(time.perf_counter() - t0)
                self.cpu.setdefault(n, []).append(time.process_time() - c0)
            if between is not None:
                between()

    def median(self, name: str) -> float:
        return median(self.samples.get(name, []))

    def ratio(self, ours: str, baseline: str, cpu: bool = False) -> float:
        """Median over rounds of the per-round speed ratio baseline_time / ours_time (robust to a
        load change between rounds, since both sides of a round ran within seconds). `cpu`: the
        same with process CPU seconds, which other processes' load disturbs much less than wall
        time (a step descheduled for a second does not count it)."""
        table = self.cpu if cpu else self.samples
        a, b = table.get(ours, []), table.get(baseline, [])
        return median([tb / ta for ta, tb in zip(a, b) if ta > 0])


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    print(title)
    print(rule)
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print(rule)
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")
    print(rule, flush=True)


def machine_line() -> str:
    import platform

    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        load = "load %.1f" % os.getloadavg()[0]
    except OSError:
        load = ""
    return (f"{cpu or platform.processor()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {load}")
