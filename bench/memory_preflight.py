"""The memory preflight's estimate (megatron/resilience/preflight.py) against the measured peak of real runs.

    python bench/memory_preflight.py [--configs z0,z1,z2,z3,z0r,z3r] [--iters 3]

Each configuration trains a ~55M-parameter Llama (8 layers, hidden 512, FFN 1408, vocabulary 32000,
micro-batch 4 x 256 tokens; large enough that the ~0.5 GiB Python/torch/DeepSpeed baseline does
not dominate) for `--iters` iterations in a fresh 1-rank trainer process (ZeRO 1/2 with
--keep-zero-stage, so they run ZeRO's optimizer, not stage 0). Measured: the peak RSS of the
process (`max_rss_gb` in metrics.jsonl, getrusage) minus the process's RSS when the memory check
ran (after the imports, the process group and the tokenizer; before the data, the model and
DeepSpeed's engine), which the trainer logs in its `memory estimate:` line. Estimated: the same
line's total minus its fixed runtime term. ratio = estimate / measured (1.0 is exact; the
acceptance band is 0.75-1.25). Final line: `ratio min=<x> max=<y>`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, llama_flags, machine_line, print_table, write_corpus  # noqa: E402

MODEL = llama_flags(8, 512, 8, 4, 1408, 256, 32000)
CONFIGS = {
    "z0": ["--zero-stage", "0"],
    "z1": ["--zero-stage", "1", "--keep-zero-stage"],
    "z2": ["--zero-stage", "2", "--keep-zero-stage"],
    "z3": ["--zero-stage", "3"],
    "z0r": ["--zero-stage", "0", "--recompute-granularity", "full"],
    "z1r": ["--zero-stage", "1", "--keep-zero-stage", "--recompute-granularity", "full"],
    "z2r": ["--zero-stage", "2", "--keep-zero-stage", "--recompute-granularity", "full"],
    "z3r": ["--zero-stage", "3", "--recompute-granularity", "full"],
    "z1bf16": ["--zero-stage", "1", "--keep-zero-stage", "--bf16"],
}
EST = re.compile(r"memory estimate: ([\d.]+) GiB per rank .*runtime ([\d.]+);.*this process uses ([\d.]+) GiB now")


def run(name: str, data: str, out: str, iters: int) -> dict:
    os.makedirs(out, exist_ok=True)
    args = MODEL + CONFIGS[name] + [
        "--data-file-list", data, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", str(iters), "--lr", "0.001",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", "--deepspeed", "--seed", "1",
        "--metrics-file", os.path.join(out, "metrics.jsonl"), "--peak-tflops", "1"]
    env = {**os.environ, "PYTHONPATH": ROOT, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2", "MEGATRON_NO_EZPZ": "1"}
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *args], env=env, capture_output=True,
                       text=True, timeout=1800)
    if p.returncode:
        raise SystemExit(f"{name}: exit {p.returncode}\n{p.stderr[-3000:]}")
    m = EST.search(p.stderr + p.stdout)
    total, runtime, base = (float(x) for x in m.groups())
    with open(os.path.join(out, "metrics.jsonl")) as f:
        peak = max(r["memory"]["max_rss_gb"] for r in map(json.loads, f) if "memory" in r)
    est, measured = total - runtime, peak - base
    return {"name": name, "estimate": est, "measured": measured, "peak": peak, "baseline": base,
            "ratio": est / measured}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="z0,z1,z2,z3,z0r,z1r,z2r,z3r")
    p.add_argument("--iters", type=int, default=3)
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_corpus(os.path.join(tmp, "data"), 200_000, 32000)
        for name in a.configs.split(","):
            rows.append(run(name, data, os.path.join(tmp, name), a.iters))
            r = rows[-1]
            print(f"{name}: estimate {r['estimate']:.2f} GiB, measured {r['measured']:.2f} GiB (peak {r['peak']:.2f} - "
                  f"baseline {r['baseline']:.2f}), ratio {r['ratio']:.2f}", flush=True)
    print(machine_line())
    print_table("memory estimate vs measured peak (GiB above the process baseline)",
                ["config", "estimate", "measured", "ratio"],
                [[r["name"], f"{r['estimate']:.2f}", f"{r['measured']:.2f}", f"{r['ratio']:.2f}"] for r in rows])
    print(f"ratio min={min(r['ratio'] for r in rows):.2f} max={max(r['ratio'] for r in rows):.2f}")
    return rows


if __name__ == "__main__":
    main()
