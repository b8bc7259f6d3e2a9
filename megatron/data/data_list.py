"""DATA_FILE_LIST parsing: one dataset per line, ``<weight> <path-prefix> <corpus>``.

Compatible with the ALCF lists (``ALCF/data-lists/*/*.txt``): fields are whitespace
separated, blank lines are skipped, a trailing ``.bin`` on the prefix is stripped, weights
need not sum to 1 (consumers normalize) and relative prefixes are relative to the current
directory. Extensions over upstream: lines whose first non-blank character is ``#`` are
comments (upstream rejects them as a wrong field count), and 2-column lines
``<weight> <path-prefix>`` (as in ALCF's ``dolma_v1_7_file_list.txt``, which upstream ships but
cannot read) are accepted with the corpus taken from the prefix's parent directory name, with
a warning. A prefix listed twice is used twice (its weights add up), with a warning.

Every problem is a `DataListError` (a ValueError) with one line naming the file and line.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field


log = logging.getLogger(__name__)


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


def corpus_from_prefix(prefix: str) -> str:
    """Corpus name of a 2-column line: the name of the prefix's parent directory."""
    return os.path.basename(os.path.dirname(os.path.normpath(prefix))) or "default"


def parse_fields(fields: list[str], path: str, lineno: int, min_weight_exclusive: bool = False,
                 allow_extra: bool = False) -> tuple[float, str, str | None]:
    """(weight, prefix with any ``.bin`` stripped, corpus or None for a 2-column line) of one line."""
    n = len(fields)
    if n < 2 or (n > 3 and not allow_extra):
        raise DataListError(f"{path}:{lineno}: expected 3 fields '<weight> <path-prefix> <corpus>', "
                            f"got {n}: {' '.join(fields)!r}")
    w = parse_weight(fields[0], path, lineno)
    if w < 0 or (min_weight_exclusive and w == 0):
        raise DataListError(f"{path}:{lineno}: weight {fields[0]} "
                            f"{'must be > 0' if min_weight_exclusive else 'is negative'}")
    prefix = fields[1][:-4] if fields[1].endswith(".bin") else fields[1]
    return w, prefix, (fields[2] if n >= 3 else None)


def warn_list_oddities(path: str, rows: list[tuple[int, str, bool]]) -> None:
    """Warn (once per list) about 2-column lines and about prefixes listed more than once.

    ``rows``: (line number, prefix, corpus was derived) per data line.
    """
    derived = [lineno for lineno, _, d in rows if d]
    if derived:
        log.warning("%s: %d line(s) have 2 fields '<weight> <path-prefix>' (first: line %d); "
                    "corpus taken from each prefix's parent directory", path, len(derived), derived[0])
    seen: dict[str, int] = {}
    for lineno, prefix, _ in rows:
        if prefix in seen:
            log.warning("%s:%d: prefix %s is already listed at line %d; it is used twice (weights add up)",
                        path, lineno, prefix, seen[prefix])
        else:
            seen[prefix] = lineno


def parse_data_file_list(path: str) -> list[DataSource]:
    """The datasets of a list file, in file order (weights as written, not normalized)."""
    sources, rows = [], []
    for lineno, fields in read_list_lines(path):
        w, prefix, corpus = parse_fields(fields, path, lineno)
        prefix = os.path.abspath(prefix)
        rows.append((lineno, prefix, corpus is None))
        sources.append(DataSource(w, prefix, corpus if corpus is not None else corpus_from_prefix(prefix),
                                  list_file=path, lineno=lineno))
    if not sources:
        raise DataListError(f"{path}: no datasets listed (the list is empty)")
    if sum(s.weight for s in sources) <= 0:
        raise DataListError(f"{path}: all weights are zero")
    warn_list_oddities(path, rows)
    return sources


def validate_sources(sources: list[DataSource], max_shown: int = 10) -> None:
    """Raise DataListError listing the `.bin`/`.idx` files that do not exist."""
    missing = [f"{p} ({s.where})" if s.list_file else p
               for s in sources for p in (s.prefix + ".bin", s.prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:max_shown])
        more = f" and {len(missing) - max_shown} more" if len(missing) > max_shown else ""
        raise DataListError(f"{len(missing)} dataset file(s) not found: {shown}{more}")
