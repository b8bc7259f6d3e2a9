"""Every benchmark ratio `bench/run.sh` reports, its target, and the summary table.

Each benchmark ends with a machine-readable line of `key=value` words (an optional leading word,
e.g. `ratio fp32=1.012 bf16=1.363 mfu_fp32=0.831 mfu_bf16=0.566`). TARGETS below says which key of
which run is compared with what; `summarize` turns a run's outputs into one row per metric:

    metric | measured | target | status

status: `ok`, `BELOW` (a minimum not reached), `ABOVE` (a maximum exceeded), `report` (no target),
`SUSPECT` (a value no quiet machine gives, e.g. a 2-rank efficiency above 1.2 on 2 cores: the 1-rank
baseline was slowed by other processes' load; re-run),
`FAILED` (the benchmark exited non-zero, or its last key=value line lacks the value, or the value
is not a finite number), `not run` (left out on purpose: QUICK or MEMORY, with the reason).

    python bench/targets.py OUT_DIR      # what run.sh calls: reads OUT_DIR/manifest.tsv

manifest.tsv has one line per run of run.sh: `run<TAB>exit status<TAB>log file`, or
`run<TAB>skip<TAB>reason`. Exit status 1 if any row is FAILED (BELOW / ABOVE do not fail the run:
several targets of issue 22 are open, and the table is where they show).
"""
from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    run: str  # run.sh's name for the benchmark run
    key: str  # key in its final line
    metric: str  # the row's label
    op: str  # ">=", "<=" or "report"
    value: float | None = None
    unit: str = ""  # "%": the value is a fraction shown as a percentage; "s": seconds
    limit: float | None = None  # above it the value is impossible on a quiet machine: the baseline was disturbed

    def judge(self, measured: float) -> str:
        if self.limit is not None and measured > self.limit:
            return f"SUSPECT (> {self.limit:g}: load)"
        if self.op == ">=":
            return "ok" if measured >= self.value else "BELOW"
        if self.op == "<=":
            return "ok" if measured <= self.value else "ABOVE"
        return "report"

    def show(self, x: float) -> str:
        if self.unit == "%":
            return f"{x * 100:.1f} %"
        return f"{x:.2f} s" if self.unit == "s" else f"{x:.3f}"

    def target_text(self) -> str:
        return "-" if self.op == "report" else f"{self.op} {self.show(self.value)}"


T = Target
# Targets of issue 22 and bench/README.md; ratios are ours / baseline measured in the same run.
TARGETS = [
    T("train_throughput", "fp32", "train_throughput fp32 ours/hf tokens/s", ">=", 1.0),
    T("train_throughput", "bf16", "train_throughput bf16 ours/hf tokens/s", ">=", 1.5),
    T("train_throughput", "mfu_fp32", "train_throughput fp32 MFU", "report", unit="%"),
    T("train_throughput", "mfu_bf16", "train_throughput bf16 MFU", ">=", 0.75, unit="%"),
    T("train_throughput_compile", "fp32", "--compile fp32 ours/hf tokens/s", ">=", 1.0),
    T("train_throughput_compile", "bf16", "--compile bf16 ours/hf tokens/s", ">=", 1.5),
    T("train_throughput_compile", "mfu_fp32", "--compile fp32 MFU", "report", unit="%"),
    T("train_throughput_compile", "mfu_bf16", "--compile bf16 MFU", ">=", 0.80, unit="%"),
    T("zero_tax", "fp32", "zero_tax ZeRO-1 1 replica / stage 0, fp32", ">=", 0.98),
    T("zero_tax", "bf16", "zero_tax ZeRO-1 1 replica / stage 0, bf16", ">=", 0.98),
    T("zero_tax", "cpu_fp32", "zero_tax same, process CPU time, fp32", "report"),
    T("zero_tax", "cpu_bf16", "zero_tax same, process CPU time, bf16", "report"),
    T("scaling", "zero1", "scaling 2-rank efficiency ZeRO-1", ">=", 0.97, limit=1.2),
    T("scaling", "zero2", "scaling 2-rank efficiency ZeRO-2", ">=", 0.97, limit=1.2),
    T("scaling", "zero3", "scaling 2-rank efficiency ZeRO-3", ">=", 0.93, limit=1.2),
    T("memory", "max", "memory peak / ZeRO formula, worst cell", "<=", 1.25),  # bf16 gradients: 2+2+K
    T("memory", "zero3/zero0", "memory ZeRO-3 / ZeRO-0 model states", "<=", 0.6),
    T("memory", "fp32grad_max", "memory fp32 grads / formula 2+4+K, worst", "report"),
    T("memory", "fp32grad_zero3/zero0", "memory fp32 grads ZeRO-3 / ZeRO-0 states", "report"),
    T("checkpoint_io", "save", "checkpoint_io save GB/s ours/torch.save", ">=", 0.8),
    T("checkpoint_io", "load", "checkpoint_io load GB/s ours/torch.load", ">=", 0.8),
    T("startup", "first_step_seconds", "startup launch -> first step", "<=", 20.0, unit="s"),
    T("data_index", "ours/mcore", "data_index cold build ours/megatron-core", "<=", 1.0),
    T("data_index", "warm_seconds", "data_index warm start", "<=", 5.0, unit="s"),
    T("preprocess", "ours/raw", "preprocess MB/s ours/raw encode", ">=", 0.8),
]

_WORD = re.compile(r"^([^=\s]+)=(\S+)$")


def parse_final_line(text: str) -> dict[str, float]:
    """The key=value words of the last line that consists of them (after an optional leading word).
    Values that are not numbers become nan, so they show as FAILED rather than disappear."""
    for line in reversed(text.splitlines()):
        words = line.split()
        if words and not _WORD.match(words[0]):
            words = words[1:]
        pairs = [_WORD.match(w) for w in words]
        if pairs and all(pairs):
            out = {}
            for m in pairs:
                try:
                    out[m.group(1)] = float(m.group(2))
                except ValueError:
                    out[m.group(1)] = math.nan
            return out
    return {}


@dataclass
class Row:
    metric: str
    measured: str
    target: str
    status: str


def rows_for(run: str, outcome: str, log_text: str = "") -> list[Row]:
    """Rows of one run: outcome is the exit status as text ("0", "1", ...) or "skip:<reason>"."""
    targets = [t for t in TARGETS if t.run == run]
    if not targets:
        return [Row(run, "-", "-", "FAILED (no targets: add them to TARGETS in bench/targets.py)")]
    if outcome.startswith("skip"):
        return [Row(t.metric, "-", t.target_text(), f"not run ({outcome.partition(':')[2] or 'skipped'})")
                for t in targets]
    values = parse_final_line(log_text)
    rows = []
    for t in targets:
        x = values.get(t.key)
        measured = "-" if x is None else t.show(x)
        if outcome != "0":
            status = f"FAILED (exit {outcome})"
        elif x is None or not math.isfinite(x):
            status = "FAILED (no value)"
        else:
            status = t.judge(x)
        rows.append(Row(t.metric, measured, t.target_text(), status))
    return rows


def format_table(rows: list[Row]) -> str:
    header = Row("metric", "measured", "target", "status")
    table = [header] + rows
    widths = [max(len(getattr(r, f)) for r in table) for f in ("metric", "measured", "target", "status")]
    lines = []
    for i, r in enumerate(table):
        cells = [r.metric, r.measured, r.target, r.status]
        lines.append(" | ".join(c.ljust(w) if k != 1 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths))))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def summarize(out_dir: str) -> tuple[str, bool]:
    """(the table, whether every benchmark produced its values) for run.sh's output directory; rows
    in TARGETS' order, a run the manifest does not name is `not run`."""
    runs: dict[str, tuple[str, str]] = {}  # run -> (outcome, log text)
    with open(os.path.join(out_dir, "manifest.tsv")) as f:
        for line in f:
            if not line.strip():
                continue
            run, outcome, rest = line.rstrip("\n").split("\t", 2)
            if outcome == "skip":
                runs[run] = ("skip:" + rest, "")
                continue
            try:
                with open(rest, errors="replace") as log:
                    runs[run] = (outcome, log.read())
            except OSError:
                runs[run] = (outcome, "")
    rows = []
    for run in dict.fromkeys(t.run for t in TARGETS):
        rows += rows_for(run, *runs.pop(run, ("skip:not in this run", "")))
    for run in runs:  # a run without targets: a mistake in run.sh or TARGETS
        rows += rows_for(run, *runs[run])
    return format_table(rows), not any(r.status.startswith("FAILED") for r in rows)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "manifest.tsv")):
        print("usage: python bench/targets.py OUT_DIR  (the directory of bench/run.sh's outputs, with manifest.tsv)",
              file=sys.stderr)
        return 2
    table, complete = summarize(argv[0])
    print(table)
    if not complete:
        print("\nsome benchmarks FAILED: see their outputs in " + argv[0], file=sys.stderr)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
