#!/usr/bin/env python
"""Blend several data lists into one, printed to stdout.

    python mix_datasets.py --inputs 0.9 papers.txt 0.1 dolma.txt > mix.txt

Each input is a global weight followed by a data list (``<weight> <prefix> <corpus>`` lines).
Line weights are normalized within their list and the global weights across lists, so an
output line's weight is ``(w / sum of its list) * (gw / sum of global weights)`` and the output
sums to 1. Lines are printed in input order as ``"{weight:.6f} {prefix} {corpus}"``; ``#``
comments and blank lines are skipped, extra fields ignored (as blendcorpus' mix_datasets.py).
``--input`` (as ALCF/notes/cpt.md writes it) works as an abbreviation of ``--inputs``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron.data.data_list import DataListError, parse_weight, read_list_lines  # noqa: E402


def read_list(path: str) -> list[tuple[float, str, str]]:
    """(weight, prefix, corpus) of every data line; weights must be > 0."""
    rows = []
    for lineno, fields in read_list_lines(path):
        if len(fields) < 3:
            raise DataListError(f"{path}:{lineno}: expected '<weight> <path-prefix> <corpus>', "
                                f"got {len(fields)} field(s): {' '.join(fields)!r}")
        w = parse_weight(fields[0], path, lineno)
        if w <= 0:
            raise DataListError(f"{path}:{lineno}: weight {fields[0]} must be > 0")
        rows.append((w, fields[1], fields[2]))
    if not rows:
        raise DataListError(f"{path}: no data lines")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # "--input" (as ALCF/notes/cpt.md writes it) and other prefixes work as argparse abbreviations
    p.add_argument("--inputs", nargs="+", required=True, metavar="W LIST",
                   help="global weight and data list, repeated")
    args = p.parse_args(argv)
    try:
        rows = mix(args.inputs)
    except DataListError as e:
        print(f"mix_datasets.py: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write("".join(f"{w:.6f} {prefix} {corpus}\n" for w, prefix, corpus in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
