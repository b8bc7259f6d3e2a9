#!/usr/bin/env python
"""Blend several data lists into one, printed to stdout.

    python mix_datasets.py --inputs 0.9 papers.txt 0.1 dolma.txt > mix.txt

Each input is a global weight followed by a data list (``<weight> <prefix> <corpus>`` lines).
Line weights are normalized within their list and the global weights across lists, so an
output line's weight is ``(w / sum of its list) * (gw / sum of global weights)`` and the output
sums to 1. Lines are printed in input order as ``"{weight:.6f} {prefix} {corpus}"``; ``#``
comments and blank lines are skipped, extra fields ignored (as blendcorpus' mix_datasets.py).
``--input`` (as ALCF/notes/cpt.md writes it) works as an abbreviation of ``--inputs``.

Beyond upstream: a weight that would print as 0.000000 gets more decimals (3 significant
digits) instead of silently becoming 0; 2-column lines ``<weight> <prefix>`` are accepted with
the corpus taken from the prefix's parent directory (warning); ``--check`` verifies that every
prefix has its ``.bin`` and ``.idx``; ``--summary`` prints per-corpus weights (and, when the
files exist, tokens and the epochs implied by ``--train-tokens``) to stderr.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron.data.data_list import (  # noqa: E402
    DataListError, DataSource, corpus_from_prefix, parse_fields, read_list_lines, validate_sources,
    warn_list_oddities)


def read_list(path: str) -> list[tuple[float, str, str]]:
    """(weight, prefix, corpus) of every data line; weights must be > 0."""
    rows, seen = [], []
    for lineno, fields in read_list_lines(path):
        w, prefix, corpus = parse_fields(fields, path, lineno, min_weight_exclusive=True, allow_extra=True)
        seen.append((lineno, prefix, corpus is None))
        rows.append((w, prefix, corpus if corpus is not None else corpus_from_prefix(prefix)))
    if not rows:
        raise DataListError(f"{path}: no data lines")
    warn_list_oddities(path, seen)
    return rows


def mix(inputs: list[str]) -> list[tuple[float, str, str]]:
    """The blended lines of ``[W1, LIST1, W2, LIST2, ...]``."""
    if len(inputs) % 2:
        raise DataListError(f"--inputs takes pairs 'WEIGHT LIST', got {len(inputs)} values")
    pairs = []
    for k in range(0, len(inputs), 2):
        try:
            gw = float(inputs[k])
        except ValueError:
            raise DataListError(f"--inputs: global weight {inputs[k]!r} (before {inputs[k + 1]}) "
                                "is not a number; expected pairs 'WEIGHT LIST'") from None
        if not gw > 0 or gw == float("inf"):
            raise DataListError(f"--inputs: global weight {inputs[k]} for {inputs[k + 1]} must be > 0")
        pairs.append((gw, inputs[k + 1]))
    lists = [(gw, read_list(path)) for gw, path in pairs]
    total_gw = sum(gw for gw, _ in lists)
    out = []
    for gw, rows in lists:
        list_sum = sum(w for w, _, _ in rows)
        out += [((w / list_sum) * (gw / total_gw), prefix, corpus) for w, prefix, corpus in rows]
    return out


def format_weight(w: float) -> str:
    """``%.6f``, or enough decimals for 3 significant digits when that would print 0.000000."""
    if w == 0 or f"{w:.6f}" != "0.000000":
        return f"{w:.6f}"
    return f"{w:.{2 - math.floor(math.log10(w))}f}"


def summary(rows: list[tuple[float, str, str]], train_tokens: float | None) -> list[str]:
    """Per-corpus lines: files, weight, and (when every file of the corpus exists) tokens and epochs."""
    from megatron.data.indexed_dataset import IndexedDataset  # noqa: PLC0415

    corpora: dict[str, list] = {}
    for w, prefix, corpus in rows:
        corpora.setdefault(corpus, []).append((w, prefix))
    lines = [f"{'corpus':<24} {'files':>6} {'weight':>10} {'tokens':>16}"
             + (f" {'epochs':>8}" if train_tokens else "")]
    tokens_cache: dict[str, int | None] = {}
    for corpus in sorted(corpora):
        files = corpora[corpus]
        weight = sum(w for w, _ in files)
        tokens: int | None = 0
        for _, prefix in files:
            if prefix not in tokens_cache:
                tokens_cache[prefix] = (int(IndexedDataset(prefix).sizes.sum(dtype="int64"))
                                        if IndexedDataset.exists(prefix) else None)
            tokens = None if tokens is None or tokens_cache[prefix] is None else tokens + tokens_cache[prefix]
        line = f"{corpus:<24} {len(files):>6} {weight:>10.6f} {tokens if tokens is not None else '-':>16}"
        if train_tokens:
            line += f" {weight * train_tokens / tokens:>8.3f}" if tokens else f" {'-':>8}"
        lines.append(line)
    lines.append(f"{'total':<24} {len(rows):>6} {sum(w for w, _, _ in rows):>10.6f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # "--input" (as ALCF/notes/cpt.md writes it) and other prefixes work as argparse abbreviations
    p.add_argument("--inputs", nargs="+", required=True, metavar="W LIST",
                   help="global weight and data list, repeated")
    p.add_argument("--check", action="store_true", help="fail if a prefix has no .bin or no .idx")
    p.add_argument("--summary", action="store_true",
                   help="print per-corpus weights (tokens and epochs when the files exist) to stderr")
    p.add_argument("--train-tokens", type=float, default=None,
                   help="with --summary: training tokens, to print each corpus's implied epochs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="mix_datasets.py: warning: %(message)s", stream=sys.stderr)
    try:
        rows = mix(args.inputs)
        if args.check:
            validate_sources([DataSource(w, prefix, corpus) for w, prefix, corpus in rows])
        lines = summary(rows, args.train_tokens) if args.summary else []
    except (DataListError, ValueError) as e:
        print(f"mix_datasets.py: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write("".join(f"{format_weight(w)} {prefix} {corpus}\n" for w, prefix, corpus in rows))
    if lines:
        sys.stderr.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
