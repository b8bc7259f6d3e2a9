"""Checkpoint I/O: our save/load (DeepSpeed layout, megatron.checkpoint.checkpointing) vs raw torch.save/load.

    python bench/checkpoint_io.py [--rounds 3] [--zero-stage 1] [--bf16]

The engine is built in this process as the trainer builds it (≈25M-parameter bench model, one
optimizer step taken so the optimizer state exists). "ours" is
`megatron.checkpoint.checkpointing.save_checkpoint` / `load_checkpoint` (model states, ZeRO optimizer
states, client state, args record, atomic tag commit). "raw" is `torch.save` of the same tensors
(the module's state dict and the optimizer's state dict) to one file, and `torch.load` of it
restored into the module and the optimizer with `load_state_dict` (what resuming needs).
GB/s = bytes on disk / seconds. Save and load alternate with the raw baseline `--rounds` times
(page cache warm for both, each round saves a new iteration / file, old ones are deleted
between rounds, untimed); ratio = ours GB/s / raw GB/s per round, median over rounds.
Final line: `ratio save=<x> load=<y>`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import machine_line, median, print_table, single_rank_env, write_corpus  # noqa: E402


def dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--small", action="store_true")
    opts = p.parse_args(argv)
    single_rank_env()
    import torch

    from bench.train_throughput import DEFAULT_MODEL, SMALL_MODEL, Ours, trainer_flags
    from megatron.checkpoint import checkpointing
    from megatron.config import Config

    print(f"# checkpoint_io: {machine_line()}", flush=True)
    m = SMALL_MODEL if opts.small else DEFAULT_MODEL
    work = tempfile.mkdtemp(prefix="bench-ckpt-")
    try:
        data_list = write_corpus(os.path.join(work, "data"), 8 * m["mbs"] * (m["seq"] + 1), m["vocab"])
        ours = Ours.build(trainer_flags(m, data_list, 4, "bf16" if opts.bf16 else "fp32", opts.zero_stage, []))
        ours.step()  # optimizer state exists
        engine, args = ours.engine, ours.args
        args.save = args.load = os.path.join(work, "ckpt")
        config = Config.from_args(args)
        raw = os.path.join(work, "raw.pt")
        opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
        times: dict[str, list[float]] = {}
        sizes: dict[str, int] = {}

        def ours_save(r: int) -> None:  # a new iteration each round, as in training
            checkpointing.save_checkpoint(engine, config, r + 1, args.global_batch_size,
                                          args.global_batch_size * args.seq_length)

        def raw_save(r: int) -> None:
            torch.save({"model": engine.module.state_dict(), "optimizer": opt.state_dict()}, f"{raw}.{r}")

        def raw_load(r: int) -> None:  # what resuming from the raw file takes: read, then restore into the objects
            state = torch.load(f"{raw}.{r}", weights_only=True)  # tensors and plain containers only
            engine.module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])

        def ours_load(r: int) -> None:
            checkpointing.load_checkpoint(engine, config)

        for r in range(opts.rounds):
            for pairs in ([("ours save", ours_save), ("raw save", raw_save)],
                          [("ours load", ours_load), ("raw load", raw_load)]):
                for name, fn in (pairs if r % 2 == 0 else pairs[::-1]):
                    t0 = time.perf_counter()
                    fn(r)
                    times.setdefault(name, []).append(time.perf_counter() - t0)
            sizes["ours"] = dir_bytes(os.path.join(args.save, f"global_step{r + 1}"))
            sizes["raw"] = dir_bytes(f"{raw}.{r}")
            # the previous round's files go outside the timed region (deleting 0.4 GB is not saving)
            shutil.rmtree(os.path.join(args.save, f"global_step{r}"), ignore_errors=True)
            if os.path.exists(f"{raw}.{r - 1}"):
                os.remove(f"{raw}.{r - 1}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gbps = {n: [(sizes["ours" if n.startswith("ours") else "raw"] / t / 1e9) for t in ts] for n, ts in times.items()}
    ratio = {op: median([a / b for a, b in zip(gbps[f"ours {op}"], gbps[f"raw {op}"])]) for op in ("save", "load")}
    rows = []
    for op in ("save", "load"):
        for who in ("raw", "ours"):
            n = f"{who} {op}"
            rows.append([n, f"{sizes[who] / 1e6:.1f}", f"{median(times[n]):.3f}", f"{median(gbps[n]):.3f}",
                         f"{ratio[op]:.3f}" if who == "ours" else ""])
    print_table(f"checkpoint_io: ZeRO {opts.zero_stage}, {'bf16' if opts.bf16 else 'fp32'}, medians of {opts.rounds} "
                "alternating rounds", ["operation", "MB", "seconds", "GB/s", "ours/raw"], rows)
    print(f"ratio save={ratio['save']:.3f} load={ratio['load']:.3f}", flush=True)
    return {"times": times, "sizes": sizes, "ratio": ratio}


if __name__ == "__main__":
    main()
