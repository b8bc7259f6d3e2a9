"""DATA_FILE_LIST parsing: one dataset per line, ``<weight> <path-prefix> <corpus>``.

Compatible with the ALCF lists (``ALCF/data-lists/*/*.txt``): fields are whitespace
separated, blank lines are skipped, a trailing ``.bin`` on the prefix is stripped, weights
need not sum to 1 (consumers normalize) and relative prefixes are relative to the current
directory. Extension over upstream: lines whose first non-blank character is ``#`` are
comments (upstream rejects them as a wrong field count).

Every problem is a `DataListError` (a ValueError) with one line naming the file and line.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field


class DataListError(ValueError):
    """A data list that cannot be used; the message names the file (and line)."""


@dataclass
class DataSource:
    weight: float
    prefix: str
    corpus: str
    list_file: str = field(default="", compare=False)
    lineno: int = field(default=0, compare=False)

    @property
    def where(self) -> str:
        return f"{self.list_file}:{self.lineno}" if self.list_file else self.prefix


def read_list_lines(path: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank, non-comment line of a list file."""
    if not os.path.isfile(path):
        raise DataListError(f"data file list not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if fields and not fields[0].startswith("#"):
                out.append((lineno, fields))
    return out


def parse_weight(text: str, path: str, lineno: int) -> float:
    """A finite float, else DataListError naming `path:lineno`."""
    try:
        w = float(text)
    except ValueError:
        raise DataListError(f"{path}:{lineno}: weight {text!r} is not a number") from None
    if not math.isfinite(w):
        raise DataListError(f"{path}:{lineno}: weight {text!r} is not finite")
    return w


def parse_data_file_list(path: str) -> list[DataSource]:
    """The datasets of a list file, in file order (weights as written, not normalized)."""
    sources = []
    for lineno, fields in read_list_lines(path):
        if len(fields) != 3:
            raise DataListError(f"{path}:{lineno}: expected 3 fields '<weight> <path-prefix> <corpus>', "
                                f"got {len(fields)}: {' '.join(fields)!r}")
        w = parse_weight(fields[0], path, lineno)
        if w < 0:
            raise DataListError(f"{path}:{lineno}: weight {fields[0]} is negative")
        prefix = fields[1][:-4] if fields[1].endswith(".bin") else fields[1]
        sources.append(DataSource(w, os.path.abspath(prefix), fields[2], list_file=path, lineno=lineno))
    if not sources:
        raise DataListError(f"{path}: no datasets listed")
    if sum(s.weight for s in sources) <= 0:
        raise DataListError(f"{path}: all weights are zero")
    return sources


def validate_sources(sources: list[DataSource], max_shown: int = 10) -> None:
    """Raise DataListError listing the `.bin`/`.idx` files that do not exist."""
    missing = [f"{p} ({s.where})" if s.list_file else p
               for s in sources for p in (s.prefix + ".bin", s.prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:max_shown])
        more = f" and {len(missing) - max_shown} more" if len(missing) > max_shown else ""
        raise DataListError(f"{len(missing)} dataset file(s) not found: {shown}{more}")
