#!/usr/bin/env python
"""Plot a run's metrics.jsonl: loss, learning rate and throughput PNGs (matplotlib, no display).

    python tools/plot_run.py checkpoints/<run>/metrics.jsonl [--output-dir DIR] [--tokens]

Writes loss.png (training loss per iteration, its running mean, validation loss), lr.png and
throughput.png (tokens/s per device and MFU) next to the metrics file unless --output-dir is
given. --tokens puts consumed tokens on the x axis instead of iterations. When a run was
resumed, the last record of each iteration wins.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap


def read_metrics(path: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """({iteration: training record}, {iteration: validation record}); later records win."""
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"ERROR: {path}:{n}: not JSON ({e}); is this a metrics.jsonl file?") from None
            if "lm_loss" in r:
                train[r["iteration"]] = r
            elif "val_loss" in r:
                val[r["iteration"]] = r
    return train, val


def per_iteration_losses(train: dict[int, dict]) -> tuple[list[int], list[float]]:
    """Expand each report's "losses" (one per iteration of its interval) to (iterations, losses)."""
    its, losses = [], []
    for it in sorted(train):
        ls = train[it].get("losses") or [train[it]["lm_loss"]]
        its += list(range(it - len(ls) + 1, it + 1))
        losses += ls
    return its, losses


def running_mean(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_run(metrics_file: str, output_dir: str | None = None, x_tokens: bool = False) -> list[str]:
    """Write loss.png, lr.png and throughput.png; returns their paths."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    train, val = read_metrics(metrics_file)
    if not train:
        raise SystemExit(f"ERROR: {metrics_file} has no training records (was --log-interval larger than the run?)")
    output_dir = output_dir or os.path.dirname(os.path.abspath(metrics_file))
    os.makedirs(output_dir, exist_ok=True)
    reports = sorted(train)
    tokens_per_iter = train[reports[-1]]["consumed_tokens"] / reports[-1]

    def x_of(its):
        return [i * tokens_per_iter / 1e9 for i in its] if x_tokens else list(its)

    xlabel = "consumed tokens (billions)" if x_tokens else "iteration"
    title = os.path.basename(os.path.dirname(os.path.abspath(metrics_file))) or metrics_file
    title = textwrap.fill(title, 80)  # run names are long: wrap instead of running off the figure
    paths = []

    its, losses = per_iteration_losses(train)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(x_of(its), losses, lw=0.8, alpha=0.4, color="C0", label="train loss")
    ax.plot(x_of(its), running_mean(losses, max(1, len(losses) // 50)), lw=1.8, color="C0",
            label=f"train loss (running mean of {max(1, len(losses) // 50)})")
    if val:
        vits = sorted(val)
        ax.plot(x_of(vits), [val[i]["val_loss"] for i in vits], "o-", color="C3", label="validation loss")
    ax.set(xlabel=xlabel, ylabel="LM loss (nats/token)", title=f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, output_dir, "loss.png", plt))

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(x_of(reports), [train[i]["lr"] for i in reports], color="C2")
    ax.set(xlabel=xlabel, ylabel="learning rate", title=f"{title}: learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    paths.append(_save(fig, output_dir, "lr.png", plt))

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    tgs = [train[i].get("tokens_per_gpu_per_sec", float("nan")) for i in reports]
    ax.plot(x_of(reports), tgs, color="C1", label="tokens/s per device")
    ax.set(xlabel=xlabel, ylabel="tokens/s per device", title=f"{title}: throughput")
    ax.grid(alpha=0.3)
    mfu = [100 * train[i]["mfu"] for i in reports if train[i].get("mfu") is not None]
    if len(mfu) == len(reports):
        ax2 = ax.twinx()
        ax2.plot(x_of(reports), mfu, color="C4", ls="--", label="MFU (%)")
        ax2.set_ylabel("MFU (%)")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right")
    paths.append(_save(fig, output_dir, "throughput.png", plt))
    return paths


def _save(fig, output_dir: str, name: str, plt) -> str:
    path = os.path.join(output_dir, name)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics_file", help="a run's metrics.jsonl (default location: <save>/metrics.jsonl)")
    p.add_argument("--output-dir", default=None, help="where the PNGs go (default: next to the metrics file)")
    p.add_argument("--tokens", action="store_true", help="consumed tokens on the x axis")
    a = p.parse_args(argv)
    if not os.path.isfile(a.metrics_file):
        print(f"ERROR: {a.metrics_file}: file not found (the trainer writes <save>/metrics.jsonl)", file=sys.stderr)
        return 2
    for path in plot_run(a.metrics_file, a.output_dir, a.tokens):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
