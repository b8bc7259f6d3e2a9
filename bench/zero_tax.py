"""The cost of DeepSpeed's ZeRO optimizer at one data-parallel replica: real ZeRO-1/2 vs stage 0.

    python bench/zero_tax.py [--stage 1] [--dtypes fp32,bf16] [--rounds 8] [--zero-config '{"overlap_comm": true}']

All sides are our trainer in this process (bench/train_throughput.py's `Ours`: the same model,
data, optimizer and `train_step`), rank 0 of 1: stage 0, and ZeRO-`--stage` with
--keep-zero-stage (DeepSpeed's ZeRO optimizer with one replica; without the flag the trainer would
run it as stage 0), once as the trainer runs it and once "as is" (without
megatron/deepspeed_compat's single-replica changes, `SINGLE_REPLICA_CHANGES`). `--zero-config` is
merged into the DeepSpeed config's `zero_optimization` block of the ZeRO side (a settings sweep).
Timed alternately, iteration by iteration; ratio = the median of the per-round stage-0-time /
ZeRO-time (1.0 = no tax); "CPU" ratios are the same with the process CPU time of each iteration,
which other processes' load disturbs much less than wall time. Final line (key=value, bench/targets.py):
`ratio fp32=<x> bf16=<y> as_is_fp32=.. as_is_bf16=.. cpu_fp32=.. cpu_bf16=.. cpu_as_is_fp32=.. cpu_as_is_bf16=..`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Interleaved, machine_line, print_table, single_rank_env, write_corpus  # noqa: E402
from bench.train_throughput import DEFAULT_MODEL, SMALL_MODEL, Ours, trainer_flags  # noqa: E402


# megatron/deepspeed_compat's changes to DeepSpeed at one data-parallel replica ("as is" = none of them)
SINGLE_REPLICA_CHANGES = ("skip_single_replica_reduction", "skip_single_replica_allreduce",
                          "share_single_replica_master_weights", "copy_first_bf16_gradient",
                          "reuse_single_replica_gradient_partition", "add_single_replica_gradients_to_fp32_partition")


def compare(m: dict, dtype: str, stage: int, zero_config: dict, rounds: int, warmup: int, workdir: str) -> dict:
    iters = warmup + rounds + 2
    data_list = write_corpus(os.path.join(workdir, f"data-{dtype}"), (iters + 1) * m["mbs"] * (m["seq"] + 1) * 2,
                             m["vocab"])
    ds_json = os.path.join(workdir, f"ds-{dtype}.json")
    with open(ds_json, "w") as f:
        json.dump({"zero_optimization": dict(zero_config)}, f)
    from megatron import deepspeed_compat

    flags = trainer_flags(m, data_list, iters, dtype, stage, ["--keep-zero-stage", "--deepspeed_config", ds_json])
    base = Ours.build(trainer_flags(m, data_list, iters, dtype, 0, []))
    zero = Ours.build(flags)
    saved = {name: getattr(deepspeed_compat, name) for name in SINGLE_REPLICA_CHANGES}
    for name in SINGLE_REPLICA_CHANGES:  # DeepSpeed's ZeRO optimizer as it is at one replica
        setattr(deepspeed_compat, name, lambda engine: False)
    try:
        as_is = Ours.build(flags)
    finally:
        for name, fn in saved.items():
            setattr(deepspeed_compat, name, fn)
    assert (base.args.zero_stage, zero.args.zero_stage) == (0, stage)
    bench = Interleaved({"stage0": base.step, "zero": zero.step, "zero_as_is": as_is.step})
    bench.run(rounds, warmup=warmup)
    return {"dtype": dtype, "stage0_s": bench.median("stage0"), "zero_s": bench.median("zero"),
            "zero_as_is_s": bench.median("zero_as_is"), "ratio": bench.ratio("zero", "stage0"),
            "ratio_as_is": bench.ratio("zero_as_is", "stage0"),
            "cpu_ratio": bench.ratio("zero", "stage0", cpu=True),
            "cpu_ratio_as_is": bench.ratio("zero_as_is", "stage0", cpu=True),
            "best_ratio": min(bench.samples["stage0"]) / min(bench.samples["zero"]),
            "losses": [float(base.losses[0]), float(zero.losses[0]), float(as_is.losses[0])],
            "last_losses": [float(base.losses[-1]), float(zero.losses[-1]), float(as_is.losses[-1])]}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2], default=1)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--small", action="store_true")
    p.add_argument("--zero-config", default="{}", help="JSON merged into zero_optimization (ZeRO side)")
    opts = p.parse_args(argv)
    single_rank_env()
    m = SMALL_MODEL if opts.small else DEFAULT_MODEL
    zc = json.loads(opts.zero_config)
    print(f"# zero_tax: {machine_line()}; zero_optimization {zc}", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        results = [compare(m, d, opts.stage, zc, opts.rounds, opts.warmup, workdir) for d in opts.dtypes.split(",")]
    print_table(f"ZeRO-{opts.stage} at one replica vs stage 0, medians of {opts.rounds} interleaved iterations "
                "(as is = without deepspeed_compat's single-replica changes)",
                ["dtype", "stage 0 s/iter", f"ZeRO-{opts.stage} s/iter", "ratio", "CPU ratio", "best/best",
                 "as is s/iter", "as is ratio", "as is CPU ratio", "last loss 0/Z/as is"],
                [[r["dtype"], f"{r['stage0_s']:.3f}", f"{r['zero_s']:.3f}", f"{r['ratio']:.3f}",
                  f"{r['cpu_ratio']:.3f}", f"{r['best_ratio']:.3f}", f"{r['zero_as_is_s']:.3f}",
                  f"{r['ratio_as_is']:.3f}", f"{r['cpu_ratio_as_is']:.3f}",
                  "%.6f/%.6f/%.6f" % tuple(r["last_losses"])] for r in results])
    print("ratio " + " ".join(f"{r['dtype']}={r['ratio']:.3f}" for r in results)
          + " " + " ".join(f"as_is_{r['dtype']}={r['ratio_as_is']:.3f}" for r in results)
          + " " + " ".join(f"cpu_{r['dtype']}={r['cpu_ratio']:.3f}" for r in results)
          + " " + " ".join(f"cpu_as_is_{r['dtype']}={r['cpu_ratio_as_is']:.3f}" for r in results), flush=True)
    return results


if __name__ == "__main__":
    main()
