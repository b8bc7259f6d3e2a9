#!/usr/bin/env python
"""Index-build benchmark: a synthetic 2,419-file data list, >= 1e8 training samples.

Times, in the same run and on the same files:

* ours, cold cache: ``build_train_valid_test_datasets`` (per-file doc/sample/shuffle indices,
  corpus shuffles, the top-level blend), written to an empty ``--data-cache-path``;
* megatron-core doing the same work: its C++ ``helpers_cpp.build_sample_idx`` and
  ``build_blending_indices`` with the same numpy glue (doc_idx/shuffle_idx via
  ``RandomState``, ``np.save``), run in the separate megatron-core venv (tools/mcore_venv.py);
* ours, warm cache: a fresh process building the same datasets from the cache (start-up time).

    python bench/data_index.py [--files 2419] [--samples 100000000] [--seq-length 128] [--workdir DIR]

The last line is `ratio ours/mcore=<wall> cpu_ours/mcore=<CPU> warm_seconds=<s>` (goals: <= 1.0 and
< 5 s). Both sides' top-level blend indices are compared (they must be identical). `--ours-only`
skips megatron-core (no second venv): our cold and warm build times and the size of the index
cache, for growth measurements (ALCF/notes/scale.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

# Same work as build_train_valid_test_datasets (train split only, concatenation + shuffle in corpus),
# with megatron-core's compiled helpers for the two loops that upstream runs in C++.
MCORE_SIDE = r'''
import json, math, os, sys, time
import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets import helpers_cpp
from megatron.core.datasets.helpers import build_sample_idx
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
spec = json.load(open(sys.argv[1])); out_dir = spec["cache"]; os.makedirs(out_dir, exist_ok=True)
spec["cpu0"] = ru.ru_utime + ru.ru_stime
seq, seed, N = spec["seq"], spec["seed"], spec["samples"]
t0 = time.time(); t_sample = 0.0
total_w = sum(w for w, _, _ in spec["files"])
corpora = {}
for j, (w, prefix, corpus) in enumerate(spec["files"]):
    ds = IndexedDataset(prefix)
    n_docs = len(ds.sequence_lengths)
    bounds = [0]; fr = [float(x) for x in spec["split"].split(",")]; tot = sum(fr)
    for f in fr: bounds.append(bounds[-1] + int(round(f / tot * float(n_docs))))
    diff = bounds[-1] - n_docs; bounds = [0] + [b - diff for b in bounds[1:]]
    docs = np.arange(bounds[0], bounds[1], dtype=np.int32)
    budget = int(math.ceil(N * (w / total_w) * 1.005))
    sizes = ds.sequence_lengths
    tokens = int(sizes[docs].sum(dtype=np.int64))
    epochs = max(1, -(-(budget * seq + 1) // tokens))
    sep = False
    if epochs > 1:
        first = ((epochs - 1) * tokens - 1) // seq
        sep = (budget - first) < int(0.80 * ((tokens - 1) // seq))
    rng = np.random.RandomState(seed)
    if sep:
        a = np.tile(docs, epochs - 1); rng.shuffle(a); b = docs.copy(); rng.shuffle(b); doc_idx = np.concatenate((a, b))
    else:
        doc_idx = np.tile(docs, epochs); rng.shuffle(doc_idx)
    t = time.time()
    sample_idx = build_sample_idx(np.array(sizes), doc_idx, seq, epochs, tokens)
    t_sample += time.time() - t
    total = sample_idx.shape[0] - 1
    n1 = first if sep else total
    s1 = np.arange(n1, dtype=np.uint32); rng.shuffle(s1)
    if n1 < total:
        s2 = np.arange(n1, total, dtype=np.uint32); rng.shuffle(s2); s1 = np.concatenate((s1, s2))
    for name, arr in (("doc", doc_idx), ("sample", sample_idx), ("shuffle", s1)):
        np.save(f"{out_dir}/{j}_{name}.npy", arr)
    corpora.setdefault(corpus, []).append(budget)
names = sorted(corpora)
sizes = np.array([sum(corpora[c]) for c in names], dtype=np.float64)
for c, n in zip(names, sizes):
    np.save(f"{out_dir}/perm_{c}.npy", np.random.RandomState(seed).permutation(int(n)))
size = int(sizes.sum()); weights = sizes / sizes.sum()
di = np.empty(size, dtype=np.int16); si = np.empty(size, dtype=np.int64)
t = time.time()
helpers_cpp.build_blending_indices(di, si, weights, len(weights), size, False)
t_blend = time.time() - t
np.save(f"{out_dir}/blend_di.npy", di); np.save(f"{out_dir}/blend_si.npy", si)
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"total": time.time() - t0, "cpu": ru.ru_utime + ru.ru_stime - spec["cpu0"], "sample_idx": t_sample,
                  "blend": t_blend, "size": size}))
'''

# Ours in a fresh process too (same footing: no memory or page cache left by the other side's arrays).
COLD = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
from megatron.data.blendable_dataset import build_train_valid_test_datasets
from megatron.data.data_list import parse_data_file_list
from megatron.data.helpers import compiled_helper
import numpy as np
compiled_helper()  # compiled once per machine (cached); not part of an index build
spec = json.load(open(sys.argv[1]))
ru = resource.getrusage(resource.RUSAGE_SELF); cpu0 = ru.ru_utime + ru.ru_stime
t0 = time.time()
train, _, _ = build_train_valid_test_datasets(parse_data_file_list(spec["list"]), spec["split"],
    (spec["samples"], 0, 0), spec["seq"], spec["seed"], spec["ours_cache"], shuffle_sample_in_corpus=True)
total = time.time() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
np.save(spec["ours_cache"] + "/../ours_blend_di.npy", np.asarray(train.dataset_index))
print(json.dumps({"total": total, "cpu": ru.ru_utime + ru.ru_stime - cpu0, "samples": len(train),
                  "corpora": len(train.datasets)}))
'''

WARM = r'''
import sys, time, json
t0 = time.time()
sys.path.insert(0, sys.argv[2])
from megatron.data.blendable_dataset import build_train_valid_test_datasets
from megatron.data.data_list import parse_data_file_list
spec = json.load(open(sys.argv[1]))
t_import = time.time() - t0
stats = {}
train, _, _ = build_train_valid_test_datasets(parse_data_file_list(spec["list"]), spec["split"],
    (spec["samples"], 0, 0), spec["seq"], spec["seed"], spec["ours_cache"], True, stats=stats)
x = train[len(train) - 1]
print(json.dumps({"total": time.time() - t0, "imports": t_import, "stats": stats}))
'''


def make_files(workdir: str, n_files: int, seed: int) -> str:
    """n_files small .bin/.idx files in ~16 corpora of skewed sizes; returns the data list path."""
    from megatron.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    corpus_names = [f"corpus{c:02d}" for c in range(16)]
    share = rng.dirichlet(np.full(16, 0.6))
    lines = []
    for j in range(n_files):
        corpus = corpus_names[int(rng.choice(16, p=share))]
        d = os.path.join(workdir, "data", corpus)
        os.makedirs(d, exist_ok=True)
        prefix = os.path.join(d, f"part-{j:05d}_text_document")
        n_docs = int(rng.integers(40, 200))
        lengths = np.maximum(1, rng.lognormal(4.6, 0.8, size=n_docs).astype(np.int64))  # ~130 tokens
        tokens = rng.integers(0, 32000, size=int(lengths.sum()), dtype=np.uint16)
        b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for part in np.split(tokens, np.cumsum(lengths)[:-1]):
            b.add_document(part)
        b.finalize(prefix + ".idx")
        weight = float(lengths.sum()) * float(rng.uniform(0.5, 3.0))  # tokens x epochs, unnormalized
        lines.append(f"{weight:.10f} {prefix} {corpus}\n")
    path = os.path.join(workdir, "list.txt")
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2419)
    p.add_argument("--samples", type=int, default=100_000_000)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--split", default="990,10,0")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--rounds", type=int, default=2, help="cold builds of each side, alternated")
    p.add_argument("--workdir", default=None, help="keep files here (default: a temporary directory)")
    p.add_argument("--ours-only", action="store_true", help="no megatron-core side: times and index size of ours")
    args = p.parse_args(argv)
    from mcore_venv import ensure_mcore_venv, isolated_env

    mcore_python = None if args.ours_only else ensure_mcore_venv()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_index_")
    try:
        t = time.time()
        list_path = make_files(workdir, args.files, args.seed)
        print(f"synthetic list: {args.files} files in {time.time() - t:.1f} s; {args.samples:.3g} train samples, "
              f"seq {args.seq_length}, split {args.split}", flush=True)
        from megatron.data.data_list import parse_data_file_list

        sources = parse_data_file_list(list_path)
        spec = {"files": [(s.weight, s.prefix, s.corpus) for s in sources], "split": args.split,
                "seq": args.seq_length, "seed": args.seed, "samples": args.samples,
                "cache": os.path.join(workdir, "cache_mcore"), "list": list_path,
                "ours_cache": os.path.join(workdir, "cache_ours")}
        spec_path = os.path.join(workdir, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        scripts = {}
        for name, text in (("ours", COLD), ("mcore", MCORE_SIDE)):
            scripts[name] = os.path.join(workdir, f"{name}_side.py")
            with open(scripts[name], "w") as f:
                f.write(text)

        def cold(side: str) -> dict:  # one cold-cache build in a fresh process
            shutil.rmtree(spec["ours_cache" if side == "ours" else "cache"], ignore_errors=True)
            cmd = ([sys.executable, scripts["ours"], spec_path, ROOT] if side == "ours"
                   else [mcore_python, scripts["mcore"], spec_path])
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir,
                                 env=None if side == "ours" else isolated_env())
            if res.returncode != 0:
                raise RuntimeError(f"{side} side failed:\n{res.stderr[-3000:]}")
            return json.loads(res.stdout.strip().splitlines()[-1])

        runs: dict[str, list[dict]] = {"ours": []} if args.ours_only else {"ours": [], "mcore": []}
        for r in range(args.rounds):  # alternate (ours, mcore), (mcore, ours), ... so load drifts hit both
            order = ("ours", "mcore") if r % 2 == 0 else ("mcore", "ours")
            for side in (("ours",) if args.ours_only else order):
                runs[side].append(cold(side))
                x = runs[side][-1]
                print(f"round {r + 1}: {side:5s} cold build {x['total']:7.2f} s wall, {x['cpu']:7.2f} s CPU", flush=True)
        best = {k: min(v, key=lambda x: x["total"]) for k, v in runs.items()}
        cpu = {k: min(x["cpu"] for x in v) for k, v in runs.items()}
        ours = best["ours"]["total"]
        print(f"ours, cold cache:             {ours:8.2f} s  (best of {args.rounds}; {best['ours']['samples']} samples, "
              f"{best['ours']['corpora']} corpora)")
        if args.ours_only:
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(spec["ours_cache"]) for f in fs)
            print(f"index cache: {size} bytes ({size / best['ours']['samples']:.2f} bytes per sample), "
                  f"CPU {cpu['ours']:.2f} s", flush=True)
            return 0
        theirs = best["mcore"]["total"]
        print(f"megatron-core helpers_cpp:    {theirs:8.2f} s  (best of {args.rounds}; build_sample_idx "
              f"{best['mcore']['sample_idx']:.2f} s, build_blending_indices {best['mcore']['blend']:.2f} s, "
              "numpy glue and saving the rest)", flush=True)
        ours_di = np.load(os.path.join(workdir, "ours_blend_di.npy"), mmap_mode="r")
        their_di = np.load(os.path.join(spec["cache"], "blend_di.npy"), mmap_mode="r")
        same = len(their_di) == len(ours_di) and bool(np.array_equal(their_di, ours_di))
        print(f"top-level blend indices identical: {'yes' if same else 'NO'}")
        warm_script = os.path.join(workdir, "warm.py")
        with open(warm_script, "w") as f:
            f.write(WARM)
        res = subprocess.run([sys.executable, warm_script, spec_path, ROOT], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        warm = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"ours, warm cache (new process): {warm['total']:.2f} s in all (Python imports {warm['imports']:.2f} s, "
              f"loading the indices {warm['total'] - warm['imports']:.2f} s)  {warm['stats']}  goal < 5 s in all")
        print(f"CPU time ours / megatron-core (cold cache, best of {args.rounds}): {cpu['ours'] / cpu['mcore']:.2f}")
        print(f"ratio ours / megatron-core (cold cache, wall, best of {args.rounds}): {ours / theirs:.2f}")
        print(f"ratio ours/mcore={ours / theirs:.3f} cpu_ours/mcore={cpu['ours'] / cpu['mcore']:.3f} "
              f"warm_seconds={warm['total']:.2f}", flush=True)
        return 0 if same else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
