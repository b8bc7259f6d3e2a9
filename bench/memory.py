"""Peak resident memory per rank against the ZeRO paper's model-state formula, 2 gloo ranks.

    python bench/memory.py [--configs z0,z1,z2,z3,z0r,z1r,z2r,z3r] [--grads bf16,fp32] [--iters 2] [--model 134m|tiny]
                           [--zero-config JSON] [--env NAME=VALUE ...]

Each configuration trains the same bf16 Llama (default 134M parameters: 12 layers, hidden 768,
FFN 2048, vocabulary 32000; micro-batch 1 x 256 tokens per rank, so the model states dominate)
for `--iters` iterations on 2 ranks (torchrun, gloo), ZeRO stage 0-3 with and without full
activation recompute; ZeRO-1/2 with --keep-zero-stage (real partitions, as any DP > 1 run); each
with the gradients in bf16 (`--grad-accum-dtype bf16`: what the ZeRO paper counts) and in fp32 (the
trainer's default, `--grad-accum-dtype fp32`: Megatron's fp32 gradient accumulation and reduction).
ZeRO-0 runs on 1 rank: the trainer refuses bf16 at stage 0 with 2 replicas (DeepSpeed's stage 0
bf16 optimizer would sum the ranks' gradients in bf16), and stage 0 partitions nothing, so its
memory per rank does not depend on the number of ranks (the formula's ZeRO-0 row has no DP).

Measured, on every rank (this script is also the per-rank entry point, `--worker`): the process's
resident memory when the trainer's memory check runs (after the imports, the process group and the
tokenizer; before the data, the model and DeepSpeed: the "baseline"), and its peak resident memory
at the end (getrusage). ours = peak - baseline, the larger of the two ranks.

Formula (Rajbhandari et al., ZeRO, section 3.1): mixed precision with Adam keeps 2 + 2 + K bytes per
parameter, K = 12 (fp32 master weights, momentum, variance); ZeRO-1 divides K by DP, ZeRO-2 also
the gradients' 2, ZeRO-3 all three terms. The fp32-gradient runs are compared with the same formula
with 4-byte gradients (2 + 4 + K: what they keep). Activations: megatron/resilience/preflight.py's
estimate for the same arguments (`activation_bytes`). ratio = ours / (formula + activations); target
<= 1.25 in every cell, judged on the bf16-gradient runs (the paper's formula). Model states measured =
ours - activation estimate; ZeRO-3's / ZeRO-0's, target <= 0.6.
Final line: `ratio max=<x> zero3/zero0=<y> fp32grad_max=<x> fp32grad_zero3/zero0=<y>` (the first two:
bf16 gradients against 2 + 2 + K; the last two: fp32 gradients against 2 + 4 + K).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import ROOT, free_port, llama_flags, machine_line, print_table, write_corpus  # noqa: E402

GIB = 2**30
DP = 2
MODELS = {  # name -> (flags, vocab)
    "134m": (llama_flags(12, 768, 12, 12, 2048, 256, 32000), 32000),
    "tiny": (llama_flags(2, 64, 4, 4, 176, 64, 512), 512),  # the smoke test's
}
CONFIGS = {
    "z0": ["--zero-stage", "0"],
    "z1": ["--zero-stage", "1", "--keep-zero-stage"],
    "z2": ["--zero-stage", "2", "--keep-zero-stage"],
    "z3": ["--zero-stage", "3"],
}
CONFIGS.update({f"{k}r": v + ["--recompute-granularity", "full"] for k, v in list(CONFIGS.items())})


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(out: str, trainer_args: list[str]) -> int:
    """One rank: the trainer, with its resident memory recorded at the memory check (the baseline),
    after the engine is built and after each forward, backward and step of the engine, and its peak."""
    import megatron.training as training
    from megatron.resilience.preflight import activation_bytes, parameters_per_rank
    from pretrain_gpt import main as trainer_main

    rec: dict = {}
    check = training.check_memory

    def check_memory(config):
        rec["baseline"] = rss_bytes()
        vocab = config.runtime.padded_vocab_size
        rec["parameters"] = parameters_per_rank(config.model, config.parallel, vocab)
        rec["activations"] = activation_bytes(config, vocab)
        rec["zero_stage"] = config.parallel.zero_stage
        rec["dp"] = config.runtime.data_parallel_size
        return check(config)

    training.check_memory = check_memory
    setup = training.setup_model_and_optimizer

    def mark(name: str) -> None:  # resident now and the peak so far, per phase; the process's CPU seconds
        usage = resource.getrusage(resource.RUSAGE_SELF)
        rec.setdefault("phases", []).append((name, rss_bytes(), usage.ru_maxrss * 1024))
        rec.setdefault("cpu", []).append(usage.ru_utime + usage.ru_stime)
        rec.setdefault("faults", []).append(usage.ru_minflt)

    def setup_model_and_optimizer(*a, **kw):
        model, engine = setup(*a, **kw)
        mark("engine")
        for phase in ("forward", "backward", "step"):  # the engine's own calls, marked after each
            def marked(*args, _f=getattr(engine, phase), _n=phase, **kwargs):
                out = _f(*args, **kwargs)
                mark(_n)
                return out
            setattr(engine, phase, marked)
        return model, engine

    training.setup_model_and_optimizer = setup_model_and_optimizer
    code = trainer_main(trainer_args)
    rec["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(rec, f)
    return code


def formula(params: int, stage: int, dp: int, k: int = 12, grad_bytes: int = 2) -> float:
    """ZeRO paper model-state bytes per rank, mixed precision: (2 + 2 + K) * params, partitioned terms / dp
    (`grad_bytes` 4: the same with fp32 gradients)."""
    weights, grads, states = 2.0 * params, float(grad_bytes * params), float(k * params)
    if stage >= 1:
        states /= dp
    if stage >= 2:
        grads /= dp
    if stage >= 3:
        weights /= dp
    return weights + grads + states


def per_iteration(rec: dict, key: str) -> list[float]:
    """A per-process counter's increase over each iteration after the first (from one step mark to the
    next): "cpu" (CPU seconds, user + system) or "faults" (minor page faults)."""
    steps = [x for (name, _, _), x in zip(rec["phases"], rec[key]) if name == "step"]
    return [b - a for a, b in zip(steps, steps[1:])]


def run(name: str, grads: str, model: str, data: str, out: str, iters: int, zero_config: dict | None = None,
        env_extra: dict | None = None, malloc: int = 0) -> dict:
    os.makedirs(out, exist_ok=True)
    flags, _ = MODELS[model]
    nproc = 1 if name.startswith("z0") else DP  # see the docstring
    args = flags + CONFIGS[name] + [
        "--bf16", "--data-file-list", data, "--split", "100,0,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "1", "--global-batch-size", str(nproc), "--train-iters", str(iters), "--lr", "1e-4",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", "--deepspeed", "--seed", "1",
        "--peak-tflops", "1", "--grad-accum-dtype", grads, "--malloc-mmap-threshold", str(malloc)]
    if zero_config:  # a settings experiment: merged into the DeepSpeed config's zero_optimization block
        with open(os.path.join(out, "ds.json"), "w") as f:
            json.dump({"zero_optimization": zero_config}, f)
        args += ["--deepspeed_config", os.path.join(out, "ds.json")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(2 // nproc), MEGATRON_NO_EZPZ="1")
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.abspath(__file__), "--worker", out, "--", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise SystemExit(f"{name}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(nproc)]
    r0 = ranks[0]
    ours = max(r["peak"] - r["baseline"] for r in ranks)
    model_states = formula(r0["parameters"], r0["zero_stage"], DP, grad_bytes=4 if grads == "fp32" else 2)
    total = model_states + r0["activations"]
    return {"name": name, "grads": grads, "ranks": nproc, "parameters": r0["parameters"], "stage": r0["zero_stage"], "ours": ours,
            "per_rank": [r["peak"] - r["baseline"] for r in ranks],
            "phases": [(n, (now - r0["baseline"]) / GIB, (pk - r0["baseline"]) / GIB) for n, now, pk in r0["phases"]], "baseline": max(r["baseline"] for r in ranks),
            "step_cpu": per_iteration(r0, "cpu"), "step_faults": per_iteration(r0, "faults"),
            "formula_states": model_states, "activations": r0["activations"], "formula_total": total,
            "ratio": ours / total, "measured_states": ours - r0["activations"]}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # torchrun's per-rank entry point: --worker OUT -- trainer args
        return worker(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="z0,z1,z2,z3,z0r,z1r,z2r,z3r")
    p.add_argument("--grads", default="bf16,fp32", help="gradient dtypes (--grad-accum-dtype) to run")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--model", choices=sorted(MODELS), default="134m")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--zero-config", default="{}", help="JSON merged into the DeepSpeed config's zero_optimization")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0, metavar="BYTES",
                   help="the trainer's --malloc-mmap-threshold (0: glibc's default, the trainer's)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="set in the ranks' environment (an allocator experiment, e.g. MALLOC_MMAP_THRESHOLD_=1048576)")
    a = p.parse_args(argv)
    names, grad_dtypes = a.configs.split(","), a.grads.split(",")
    bad = [n for n in names if n not in CONFIGS] + [g for g in grad_dtypes if g not in ("bf16", "fp32")]
    if bad:
        raise SystemExit(f"unknown config(s) or gradient dtype(s) {bad}; choose from {sorted(CONFIGS)} and bf16, fp32")
    env_extra = dict(kv.split("=", 1) for kv in a.env)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_corpus(os.path.join(tmp, "data"), 100_000, MODELS[a.model][1])
        for grads in grad_dtypes:
            for name in names:
                r = run(name, grads, a.model, data, os.path.join(tmp, f"{name}-{grads}"), a.iters,
                        json.loads(a.zero_config), env_extra, a.malloc_mmap_threshold)
                rows.append(r)
                print(f"{name} {grads} gradients: ours {r['ours'] / GIB:.2f} GiB (ranks "
                      f"{[round(x / GIB, 2) for x in r['per_rank']]}, baseline {r['baseline'] / GIB:.2f}), formula "
                      f"{r['formula_states'] / GIB:.2f} + activations {r['activations'] / GIB:.2f} GiB, ratio "
                      f"{r['ratio']:.2f}; rank 0 CPU s per iteration after the first "
                      f"{[round(x, 2) for x in r['step_cpu']]}, minor page faults {r['step_faults']}; rank 0 "
                      f"(now/peak GiB): "
                      + ", ".join(f"{n} {x:.2f}/{y:.2f}" for n, x, y in r["phases"]), flush=True)
    print(machine_line())
    print_table(f"peak resident memory per rank above the baseline, {rows[0]['parameters'] / 1e6:.0f}M parameters, "
                f"bf16 weights, {DP} ranks (GiB); formula: 2 + G + 12 bytes/parameter, G = the gradients' bytes",
                ["config", "gradients", "ranks", "ours", "formula states", "activations (est.)", "formula total",
                 "ours / formula"],
                [[r["name"], f"{r['grads']} (G={4 if r['grads'] == 'fp32' else 2})", str(r["ranks"]),
                  f"{r['ours'] / GIB:.2f}", f"{r['formula_states'] / GIB:.2f}", f"{r['activations'] / GIB:.2f}",
                  f"{r['formula_total'] / GIB:.2f}", f"{r['ratio']:.2f}"] for r in rows])
    summary = {}
    for grads, prefix in (("bf16", ""), ("fp32", "fp32grad_")):
        mine = [r for r in rows if r["grads"] == grads]
        by = {r["name"]: r for r in mine}
        pairs = [(z3, z0) for z3, z0 in (("z3", "z0"), ("z3r", "z0r")) if z3 in by and z0 in by]
        summary[prefix + "max"] = max((r["ratio"] for r in mine), default=float("nan"))
        summary[prefix + "zero3/zero0"] = max((by[x]["measured_states"] / by[y]["measured_states"] for x, y in pairs),
                                              default=float("nan"))
    print("ratio " + " ".join(f"{k}={v:.2f}" for k, v in summary.items()), flush=True)
    result = {"rows": rows, **summary}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    out = main()
    if sys.argv[1:2] == ["--worker"]:  # as pretrain_gpt.py: skip the interpreter's teardown, where gloo's and
        sys.stdout.flush()  # DeepSpeed's C++ threads now and then abort a finished rank (SIGABRT, "terminate
        sys.stderr.flush()  # called without an active exception"; seen once at ZeRO-2 here)
        os._exit(out)
    sys.exit(out if isinstance(out, int) else 0)
