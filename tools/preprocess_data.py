#!/usr/bin/env python
"""Tokenize a JSON-lines corpus into Megatron ``.bin/.idx`` files.

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --output-prefix data/corpus --tokenizer-type Llama2Tokenizer \\
        --tokenizer-model tokenizer.model --append-eod --workers 2

writes ``data/corpus_text_document.bin/.idx`` (one sequence per document; uint16 tokens when
the vocabulary has fewer than 65,500 ids, else int32). Documents with no token are skipped.

Plain text instead of JSON lines: ``--input-type text-file`` (every input file is one document;
``--input`` may list files and directories, read recursively in sorted order) or
``--input-type text-blocks`` (documents separated by blank lines); the output key is ``text``.
Progress lines (every ``--log-interval`` documents, stderr) show documents/s and MB/s.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype  # noqa: E402
from megatron.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402

CHUNK_LINES = 64


class Encoder:
    """Tokenizes chunks of JSON lines; one tokenizer per (worker) process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tokenizer = None

    def initialize(self) -> None:
        a = self.args
        self.tokenizer = build_tokenizer(a.tokenizer_type, a.tokenizer_model, vocab_size=a.vocab_size,
                                         vocab_file=a.vocab_file, merge_file=a.merge_file)

    def encode_chunk(self, chunk: tuple[str, list[tuple[str, str]]]) -> tuple[list[dict[str, np.ndarray]], int]:
        """Token arrays per key for every document of a chunk ``(input type, [(where, payload)])``."""
        if self.tokenizer is None:
            self.initialize()
        kind, items = chunk
        docs = []
        for where, payload in items:
            if kind == "jsonl":
                if not payload.strip():
                    continue
                try:
                    record = json.loads(payload)
                    texts = {key: record[key] for key in self.args.json_keys}
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{where}: cannot read keys {self.args.json_keys}: {e}") from None
            else:
                texts = {"text": payload}
            out = {}
            for key, text in texts.items():
                try:
                    ids = self.tokenizer.tokenize(str(text))
                except ValueError as e:
                    raise ValueError(f"{where}: cannot tokenize {key!r}: {e}") from None
                if ids and self.args.append_eod:
                    ids = list(ids) + [self.tokenizer.eod]
                out[key] = np.asarray(ids, dtype=np.int64)
            docs.append(out)
        return docs, sum(len(payload.encode("utf-8")) for _, payload in items)


_ENCODER: Encoder | None = None  # per worker process, set by the pool initializer


def _init_worker(args: argparse.Namespace) -> None:
    global _ENCODER  # noqa: PLW0603
    _ENCODER = Encoder(args)
    _ENCODER.initialize()


def _encode_in_worker(chunk: tuple[int, list[str]]):
    return _ENCODER.encode_chunk(chunk)


def input_files(paths: list[str]) -> list[str]:
    """Files of ``paths``, directories expanded recursively in sorted order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            for dirpath, dirnames, names in os.walk(path):
                dirnames.sort()
                files += [os.path.join(dirpath, n) for n in sorted(names) if not n.startswith(".")]
        else:
            files.append(path)
    return files


def _documents(paths: list[str], kind: str) -> Iterator[tuple[str, str]]:
    """(where, payload): JSON lines, whole files, or blank-line separated blocks."""
    for path in input_files(paths):
        with open(path, encoding="utf-8", errors="replace") as f:
            if kind == "jsonl":
                for n, line in enumerate(f, start=1):
                    yield f"{path}:{n}", line
            elif kind == "text-file":
                text = f.read()
                if text.strip():
                    yield path, text
            else:  # text-blocks
                block, first = [], 1
                for n, line in enumerate(f, start=1):
                    if line.strip():
                        if not block:
                            first = n
                        block.append(line)
                    elif block:
                        yield f"{path}:{first}", "".join(block)
                        block = []
                if block:
                    yield f"{path}:{first}", "".join(block)


def _chunks(paths: list[str], kind: str) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    items = []
    for item in _documents(paths, kind):
        items.append(item)
        if len(items) == CHUNK_LINES:
            yield kind, items
            items = []
    if items:
        yield kind, items


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="JSON-lines file(s), one document per line (or text files/directories, see --input-type)")
    p.add_argument("--input-type", choices=["jsonl", "text-file", "text-blocks"], default="jsonl",
                   help="jsonl (default); text-file: one document per file; text-blocks: documents "
                        "separated by blank lines")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (default: text)")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", default=None, help="sentencepiece .model or HF tokenizer directory")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document id to every document")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")
    args = p.parse_args(argv)
    for path in args.input:
        if not os.path.exists(path):
            p.error(f"input not found: {path}")
    if args.input_type != "jsonl":
        args.json_keys = ["text"]
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    start = time.time()
    try:
        encoder = Encoder(args)
        encoder.initialize()  # fail early on a bad tokenizer, and learn the vocabulary size
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dtype = best_dtype(encoder.tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    tmp = {key: f"{prefix}.tmp{os.getpid()}" for key, prefix in prefixes.items()}
    builders = {key: IndexedDatasetBuilder(tmp[key] + ".bin", dtype=dtype) for key in args.json_keys}
    n_docs, n_bytes, skipped = 0, 0, 0
    n_tokens, n_kept = dict.fromkeys(args.json_keys, 0), dict.fromkeys(args.json_keys, 0)

    pool = None
    if args.workers > 1:
        pool = multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=(args,))
        results = pool.imap(_encode_in_worker, _chunks(args.input, args.input_type))
    else:
        results = map(encoder.encode_chunk, _chunks(args.input, args.input_type))
    try:
        for docs, chunk_bytes in results:
            n_bytes += chunk_bytes
            for doc in docs:
                for key, ids in doc.items():
                    if len(ids) == 0:
                        skipped += 1
                        continue
                    builders[key].add_document(ids)
                    n_tokens[key] += len(ids)
                    n_kept[key] += 1
                n_docs += 1
                if n_docs % args.log_interval == 0:
                    elapsed = time.time() - start
                    print(f"processed {n_docs} documents ({n_docs / elapsed:.0f} docs/s, "
                          f"{n_bytes / 1e6 / elapsed:.2f} MB/s)", file=sys.stderr, flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        for key, builder in builders.items():
            builder.finalize(tmp[key] + ".idx")
            for ext in (".bin", ".idx"):
                os.unlink(tmp[key] + ext)
        return 1
    finally:
        if pool is not None:
            pool.terminate()
    for key, builder in builders.items():
        builder.finalize(tmp[key] + ".idx")
        os.replace(tmp[key] + ".bin", prefixes[key] + ".bin")
        os.replace(tmp[key] + ".idx", prefixes[key] + ".idx")
    elapsed = time.time() - start
    for key, prefix in prefixes.items():
        print(f"{prefix}.bin/.idx: {n_kept[key]} documents, {n_tokens[key]} tokens, dtype {dtype}")
    print(f"{n_docs} documents ({skipped} empty texts skipped), {n_bytes / 1e6:.1f} MB in {elapsed:.1f} s "
          f"({n_docs / max(elapsed, 1e-9):.0f} docs/s, {n_bytes / 1e6 / max(elapsed, 1e-9):.2f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
