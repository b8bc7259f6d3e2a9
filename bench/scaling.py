"""Data-parallel scaling on one machine: 1 rank x 2 threads vs 2 ranks x 1 thread (ZeRO 1, 2, 3).

    python bench/scaling.py [--rounds 2] [--iters 10] [--stages 1,2,3] [--zero-config JSON] [--baseline zero1]

Every configuration runs the real trainer (`pretrain_gpt.py` under torchrun, gloo) with the same
model, global batch, data and dtype; the 1-rank run takes the global batch as 2 micro-batches
(gradient accumulation), the 2-rank runs as 1 micro-batch per rank. tokens/s is read from each
run's metrics.jsonl (the median of the logged intervals after the first, which holds warm-up).
Configurations run alternately, `--rounds` times; efficiency = tokens/s(2 ranks) / tokens/s(1 rank)
of the same round, median over rounds. On a 2-core CPU the same cores do the work either way, so
the efficiency is the cost of the communication and of ZeRO's partitioning (1.0 = free).
Final line: `efficiency zero1=<x> zero2=<y> zero3=<z>`.

`--baseline zero1` (a load-robust proxy): no 1-rank run; each stage's 2-rank tokens/s is divided by the 2-rank
ZeRO-1 run's of the same round (run alternately with them; ZeRO-1's quiet efficiency is ~1.0). Two 1-thread
processes lose much less to other load on the machine than one 2-thread process does, so this ratio moves less
with load than the efficiency. Final line: `vs_zero1 zero2=<y> zero3=<z>`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import llama_flags, machine_line, median, print_table, write_corpus  # noqa: E402

MODEL = llama_flags(4, 256, 8, 8, 704, 256, 2048)
VOCAB, SEQ = 2048, 256


def run_config(nproc: int, zero: int, data_list: str, workdir: str, iters: int, gbs: int, tag: str,
               dtype: str, zero_config: dict | None = None) -> float:
    """tokens/s of one trainer run (median of the logged intervals after the first)."""
    from tests.distributed import run_trainer

    metrics = os.path.join(workdir, f"{tag}.jsonl")
    flags = MODEL + ["--micro-batch-size", str(gbs // 2), "--global-batch-size", str(gbs),
                     "--train-iters", str(iters), "--lr", "3e-4", "--lr-warmup-iters", "0",
                     "--data-file-list", data_list, "--split", "100,0,0", "--eval-iters", "0",
                     "--eval-interval", "1000000", "--log-interval", "2", "--zero-stage", str(zero),
                     "--metrics-file", metrics, "--data-cache-path", os.path.join(workdir, "cache")]
    if dtype == "bf16":
        flags.append("--bf16")
    if zero_config and nproc > 1:  # a settings experiment: the 2-rank runs' zero_optimization block
        ds = os.path.join(workdir, f"{tag}.ds.json")
        with open(ds, "w") as f:
            json.dump({"zero_optimization": zero_config}, f)
        flags += ["--deepspeed_config", ds]
    # the two cores either way: 1 rank x 2 threads, or 2 ranks x 1 thread (run_trainer's default is 1 thread)
    run_trainer(flags, nproc=nproc, launcher="torchrun" if nproc > 1 else "python", timeout=1800,
                env_extra={"OMP_NUM_THREADS": str(2 // nproc), "TEST_WARM": "0"})  # fresh processes, as a user's
    with open(metrics) as f:
        rates = [r["tokens_per_sec"] for r in map(json.loads, f) if "tokens_per_sec" in r]
    return median(rates[1:] or rates)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--zero-config", default="{}", help="JSON merged into the 2-rank runs' zero_optimization")
    p.add_argument("--baseline", choices=["1x2", "zero1"], default="1x2",
                   help="1x2: 1 rank x 2 threads (the efficiency); zero1: the 2-rank ZeRO-1 run (a load-robust proxy)")
    opts = p.parse_args(argv)
    stages = [int(s) for s in opts.stages.split(",")]
    if opts.baseline == "zero1":
        stages = [z for z in stages if z != 1]
        base_name, base_row = "2x1 zero1", ["2 ranks x 1 thread", "1"]
        configs = [(base_name, 2, 1)] + [(f"2x1 zero{z}", 2, z) for z in stages]
    else:
        base_name, base_row = "1x2 zero1", ["1 rank x 2 threads", "1"]
        configs = [(base_name, 1, 1)] + [(f"2x1 zero{z}", 2, z) for z in stages]
    print(f"# scaling: {machine_line()}", flush=True)
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        data_list = write_corpus(os.path.join(workdir, "data"), (opts.iters + 2) * opts.global_batch * (SEQ + 1) * 2,
                                 VOCAB)
        for r in range(opts.rounds):
            order = configs if r % 2 == 0 else configs[::-1]
            for name, nproc, zero in order:
                tag = f"{name.replace(' ', '_')}_{r}"
                rates.setdefault(name, []).append(
                    run_config(nproc, zero, data_list, workdir, opts.iters, opts.global_batch, tag, opts.dtype,
                               json.loads(opts.zero_config)))
    base = rates[base_name]
    eff = {z: median([t / b for t, b in zip(rates[f"2x1 zero{z}"], base)]) for z in stages}
    rows = [base_row + [f"{median(base):.0f}", "1.000"]]
    rows += [["2 ranks x 1 thread", str(z), f"{median(rates[f'2x1 zero{z}']):.0f}", f"{eff[z]:.3f}"] for z in stages]
    column = "efficiency" if opts.baseline == "1x2" else "vs_zero1"
    print_table(f"scaling: global batch {opts.global_batch} x seq {SEQ}, {opts.dtype}, {opts.iters} iterations, "
                f"medians of {opts.rounds} alternating rounds", ["config", "ZeRO", "tokens/s", column], rows)
    print(f"{column} " + " ".join(f"zero{z}={eff[z]:.3f}" for z in stages), flush=True)
    return {"rates": rates, column: eff}


if __name__ == "__main__":
    main()
