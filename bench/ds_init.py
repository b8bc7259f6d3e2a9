#!/usr/bin/env python
"""DeepSpeed start-up cost at 1 and 2 ranks, and what in it grows with the number of ranks.

    python bench/ds_init.py [--rounds 2] [--layers 2] [--hidden 256]

Runs the trainer's start-up path (`initialize_megatron`, `setup_model_and_optimizer`: the GPTModel,
the optimizer, `deepspeed.initialize` with ZeRO-1) under torchrun with 1 and then 2 gloo ranks,
alternated, each rank in a fresh process. Every rank times its phases and counts the collectives
(torch.distributed calls: kind, number, bytes) and process groups made during them. Printed per
world size: the median phase times of rank 0 and the collective counts; the final line is the
ratio 2 ranks / 1 rank of the `deepspeed.initialize` time (ALCF/notes/scale.md extrapolates the
collective counts and bytes to 3,072 ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import free_port, llama_flags  # noqa: E402

RANK_SIDE = r'''
import json, os, sys, time
t0 = time.time()
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from collections import Counter
calls, nbytes = Counter(), Counter()
def wrap(name):
    fn = getattr(dist, name)
    def counted(*a, **k):
        calls[name] += 1
        for x in list(a) + list(k.values()):
            if torch.is_tensor(x):
                nbytes[name] += x.numel() * x.element_size()
            elif isinstance(x, (list, tuple)):
                nbytes[name] += sum(t.numel() * t.element_size() for t in x if torch.is_tensor(t))
        return fn(*a, **k)
    setattr(dist, name, counted)
for name in ("broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "barrier",
             "new_group", "broadcast_object_list", "all_gather_object"):
    wrap(name)
from megatron.arguments import parse_args
from megatron.initialize import initialize_megatron
from megatron.training import build_tokenizer_and_vocab, setup_model_and_optimizer
t_import = time.time() - t0
args = parse_args(json.loads(sys.argv[2]))
t = time.time(); initialize_megatron(args); t_dist = time.time() - t
dist_calls = dict(calls); calls.clear(); nbytes.clear()
if sys.argv[3] == "init-only":
    if args.rank == 0:
        print(json.dumps({"imports": t_import, "dist_init": t_dist, "dist_calls": dist_calls}))
    dist.barrier(); dist.destroy_process_group(); sys.exit(0)
build_tokenizer_and_vocab(args)
if sys.argv[3] == "profile":  # where setup_model_and_optimizer's time goes (cumulative, top entries)
    import cProfile, io, pstats
    prof = cProfile.Profile(); prof.enable()
t = time.time(); model, engine = setup_model_and_optimizer(args); t_ds = time.time() - t
if sys.argv[3] == "profile":
    prof.disable(); out = io.StringIO(); pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(30)
    print(out.getvalue(), file=sys.stderr)
if args.rank == 0:
    print(json.dumps({"imports": t_import, "dist_init": t_dist, "ds_init": t_ds, "dist_calls": dist_calls,
                      "ds_calls": dict(calls), "ds_bytes": dict(nbytes),
                      "params": sum(p.numel() for p in model.parameters())}))
dist.barrier(); dist.destroy_process_group()
'''


def run(nproc: int, script: str, argv: list[str], mode: str = "full") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(max(1, 2 // nproc)), DS_ACCELERATOR="cpu", MEGATRON_NO_EZPZ="1",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), script, ROOT, json.dumps(argv), mode]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    if mode == "profile":
        print("\n".join(ln for ln in res.stderr.splitlines() if "cumtime" in ln or "{" in ln or ".py:" in ln))
    return json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--profile", action="store_true", help="also profile the 1-rank set-up (cProfile, cumulative)")
    p.add_argument("--init-ranks", default="1,2,4,8",
                   help="world sizes for the process-group set-up alone (initialize_megatron), oversubscribed")
    a = p.parse_args(argv)
    h = a.hidden
    trainer = llama_flags(a.layers, h, 4, 2, 4 * h, 128, 8000) + ["--micro-batch-size", "1", "--global-batch-size", "2",
               "--train-iters", "1", "--lr", "1e-3", "--data-path", "unused", "--deepspeed", "--zero-stage", "1",
               "--keep-zero-stage"]
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "rank.py")
        with open(script, "w") as f:
            f.write(RANK_SIDE)
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for r in range(a.rounds):  # alternate 1, 2 / 2, 1 so load drifts hit both
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                runs[n].append(run(n, script, trainer))
                x = runs[n][-1]
                print(f"round {r + 1}: {n} rank(s): imports {x['imports']:.2f} s, dist init {x['dist_init']:.2f} s, "
                      f"deepspeed.initialize {x['ds_init']:.2f} s", flush=True)
        if a.profile:
            run(1, script, trainer, "profile")
        for n in [int(x) for x in a.init_ranks.split(",") if x]:
            x = run(n, script, [*trainer, "--global-batch-size", str(n)], "init-only")
            print(f"initialize_megatron at {n} rank(s): {x['dist_init']:.2f} s; torch.distributed calls "
                  f"{x['dist_calls']}", flush=True)
    if not runs[1]:  # --rounds 0: the profile or the group set-up only
        return 0
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("imports", "dist_init", "ds_init")}
           for n, v in runs.items()}
    print(f"model: {runs[1][0]['params']:,} parameters, ZeRO-1, fp32, gloo")
    for n in (1, 2):
        last = runs[n][-1]
        print(f"{n} rank(s): median imports {med[n]['imports']:.2f} s, dist init {med[n]['dist_init']:.2f} s, "
              f"deepspeed.initialize {med[n]['ds_init']:.2f} s")
        print(f"  collectives in initialize_megatron: {last['dist_calls']}")
        print(f"  collectives in setup_model_and_optimizer: {last['ds_calls']}; bytes {last['ds_bytes']}")
    print(f"ratio ds_init 2 ranks / 1 rank: {med[2]['ds_init'] / med[1]['ds_init']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
