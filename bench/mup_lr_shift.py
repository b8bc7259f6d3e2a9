"""Does the optimal learning rate move when the model gets wider? Standard parametrization (SP)
against MuP, on the demo data (Shakespeare).

    python bench/mup_lr_shift.py [--widths 64 256] [--steps 400] [--jobs 2] [--json out.json]

For each parametrization, width and learning rate this trains the real model from scratch with
the trainer's own pieces, in-process and on one rank: arguments through `megatron.arguments`
(so every flag is validated as in a real run), `GPTModel` from `megatron.training.model_config`,
the AdamW entry of the optimizer registry (`build_optimizer`, which applies the MuP per-group
LR / weight-decay / eps multipliers), the LR scheduler (`build_scheduler`: linear warmup over
5 %, cosine decay to LR/10), gradient clipping at 1.0, weight decay 0.1, Adam betas (0.9, 0.95)
and eps 1e-5 (the launcher's defaults). The loss is measured on held-out demo text (the last 5 %
of the corpus) after the last step.

* SP: the model as `train_alcf.sh` builds it (init std 0.02 at every width).
* MuP: `--enable-mup --mup-base-width <smallest width>`. The attention alpha is set to
  sqrt(head dim of the base width), so that at the base width the MuP model *is* the SP model
  (see ALCF/notes/mup.md); the two base-width columns therefore agree, and the question is only
  where the optimum of the wide model lies.

The optimum of each (parametrization, width) is the LR of the lowest loss, refined by a
parabola through that point and its two neighbours in log2(LR) (not refined at the grid's
edge, marked "edge"). The shift is log2(optimum at the widest / optimum at the base width):
0 means the LR transfers, -2 means the wide model wants a 4x smaller LR.

The data is the demo corpus, tokenized with a 1024-token vocabulary by default (built once
with `tools/build_demo_data.py --vocab-size`, cached in .cache/): with the launcher's 8000
tokens the embedding and output layers would dominate the small models' time. Losses do not
depend on the machine's load, only the run time does. Final line:
`optimum_shift_log2 sp=... mup=...`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python bench/mup_lr_shift.py` from anywhere
    sys.path.insert(0, ROOT)

PARAMETRIZATIONS = ("SP", "MuP")
DEFAULT_LRS = (3.162e-4, 1e-3, 3.162e-3, 1e-2, 3.162e-2)  # 5 points, 2 decades, log-spaced


@dataclass(frozen=True)
class RunSpec:
    parametrization: str  # "SP" or "MuP"
    width: int
    lr: float
    base_width: int
    data_list: str
    tokenizer_model: str
    steps: int = 400
    layers: int = 2
    heads: int = 4
    seq: int = 64
    batch: int = 8
    val_batches: int = 8
    seed: int = 1234
    threads: int = 1


@dataclass
class RunResult:
    parametrization: str
    width: int
    lr: float
    val_loss: float  # nan when the run diverged
    train_loss: float  # mean of the last 10 steps' losses
    seconds: float


def trainer_argv(spec: RunSpec) -> list[str]:
    """The flags of one run (the launcher's architecture for a Llama-style model)."""
    argv = [
        "--num-layers", str(spec.layers), "--hidden-size", str(spec.width),
        "--num-attention-heads", str(spec.heads), "--num-key-value-heads", str(spec.heads),
        "--ffn-hidden-size", str(8 * spec.width // 3), "--seq-length", str(spec.seq),
        "--max-position-embeddings", str(spec.seq), "--swiglu", "--normalization", "rmsnorm",
        "--disable-bias-linear", "--use-rotary-position-embeddings", "--untie-embeddings-and-output-weights",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--init-method-std", "0.02",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spec.tokenizer_model,
        "--data-file-list", spec.data_list, "--micro-batch-size", str(spec.batch),
        "--global-batch-size", str(spec.batch), "--train-iters", str(spec.steps),
        "--optimizer", "adamw", "--lr", repr(spec.lr), "--min-lr", repr(spec.lr / 10),
        "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.05", "--weight-decay", "0.1",
        "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--adam-eps", "1e-5", "--clip-grad", "1.0",
        "--seed", str(spec.seed),
    ]
    if spec.parametrization == "MuP":
        base_head_dim = spec.base_width // spec.heads
        argv += ["--enable-mup", "--mup-base-width", str(spec.base_width),
                 "--mup-attn-alpha", repr(math.sqrt(base_head_dim))]
    return argv


def load_tokens(data_list: str):
    """All tokens of the corpus in the data list (one prefix), as one int64 array."""
    import numpy as np

    from megatron.data.indexed_dataset import IndexedDataset

    with open(data_list) as f:
        prefix = f.read().split()[1]
    ds = IndexedDataset(prefix)
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


def windows(tokens, n: int, batch: int, seq: int, lo: int, hi: int, seed: int):
    """`n` batches of `batch` random windows of seq + 1 tokens from tokens[lo:hi]."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    starts = rng.integers(lo, hi - seq - 1, size=(n, batch))
    idx = starts[..., None] + np.arange(seq + 1)
    return [torch.from_numpy(tokens[i]) for i in idx]


def train_one(spec: RunSpec) -> RunResult:
    """Train one model from scratch and return its held-out loss (in a worker process)."""
    import torch

    from megatron.arguments import parse_args
    from megatron.config import Config
    from megatron.model import GPTModel
    from megatron.optimizer import build_optimizer
    from megatron.schedules import build_scheduler
    from megatron.training import build_tokenizer_and_vocab, model_config

    torch.set_num_threads(spec.threads)
    start = time.time()
    args = parse_args(trainer_argv(spec), env={})
    build_tokenizer_and_vocab(args)
    tokens = load_tokens(spec.data_list)
    split = int(len(tokens) * 0.95)  # the last 5 % of the corpus is held out
    train = windows(tokens, spec.steps, spec.batch, spec.seq, 0, split, spec.seed)
    val = windows(tokens, spec.val_batches, spec.batch, spec.seq, split, len(tokens), spec.seed + 1)

    torch.manual_seed(spec.seed)
    config = Config.from_args(args)
    model = GPTModel(model_config(config))
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses: list[float] = []
    for batch in train:
        loss = model(batch[:, :-1], labels=batch[:, 1:]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        optimizer.step()
        scheduler.step(args.global_batch_size)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    val_loss = float("nan")
    if math.isfinite(losses[-1]):
        model.eval()
        with torch.no_grad():
            val_loss = sum(float(model(b[:, :-1], labels=b[:, 1:]).mean()) for b in val) / len(val)
    tail = losses[-10:]
    return RunResult(spec.parametrization, spec.width, spec.lr, val_loss if math.isfinite(val_loss) else float("nan"),
                     sum(tail) / len(tail), time.time() - start)


def optimum(lrs: list[float], losses: list[float]) -> tuple[float, bool]:
    """(optimal LR, at_edge): the grid's best LR refined by a parabola in log2(LR) through it and its
    two neighbours; not refined when the best is at the grid's edge or a neighbour diverged."""
    vals = [x if math.isfinite(x) else math.inf for x in losses]
    i = min(range(len(vals)), key=vals.__getitem__)
    if not math.isfinite(vals[i]):
        return float("nan"), True
    if i == 0 or i == len(vals) - 1 or not (math.isfinite(vals[i - 1]) and math.isfinite(vals[i + 1])):
        return lrs[i], i in (0, len(vals) - 1)
    x0, x1, x2 = (math.log2(lrs[j]) for j in (i - 1, i, i + 1))
    y0, y1, y2 = vals[i - 1], vals[i], vals[i + 1]
    # vertex of the parabola through the three points (general spacing)
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / den
    if a <= 0:
        return lrs[i], False
    x = min(max(-b / (2 * a), x0), x2)
    return 2.0 ** x, False


def build_data(data_dir: str | None, vocab_size: int) -> str:
    from tools.build_demo_data import build_demo_data

    if data_dir is None:
        name = "demo-data" if vocab_size == 8000 else f"demo-data-vocab{vocab_size}"
        data_dir = os.path.join(ROOT, ".cache", name)
    return build_demo_data(data_dir, vocab_size=vocab_size)


def _fmt_loss(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "diverged"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256], help="hidden sizes; the smallest is MuP's base")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="peak learning rates")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4, help="fixed: the head dimension grows with the width")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=1024, help="demo tokenizer size (the launcher's demo: 8000)")
    p.add_argument("--data-dir", default=None, help="demo data directory (built if missing; default .cache/)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    widths, lrs = sorted(set(a.widths)), sorted(set(a.lrs))
    if len(widths) < 2 or len(lrs) < 3:
        p.error("give at least 2 widths and 3 learning rates")
    if any(w % a.heads for w in widths):
        p.error(f"every width must be a multiple of --heads {a.heads}")

    data_list = build_data(a.data_dir, a.vocab_size)
    tokenizer = os.path.join(os.path.dirname(data_list), "tokenizer.model")
    specs = [RunSpec(par, w, lr, widths[0], data_list, tokenizer, steps=a.steps, layers=a.layers, heads=a.heads,
                     seq=a.seq, batch=a.batch, val_batches=a.val_batches, seed=a.seed, threads=a.threads)
             for par in PARAMETRIZATIONS for w in widths for lr in lrs]
    print(f"mup_lr_shift: {len(specs)} runs: widths {widths} x {len(lrs)} LRs x SP/MuP; {a.layers} layers, "
          f"{a.heads} heads, seq {a.seq}, batch {a.batch}, {a.steps} steps, vocab {a.vocab_size}; "
          f"{a.jobs} job(s) x {a.threads} thread(s)", flush=True)
    start = time.time()
    order = sorted(range(len(specs)), key=lambda i: -specs[i].width)  # the slow ones first
    results: dict[int, RunResult] = {}
    if a.jobs <= 1:
        for i in order:
            results[i] = train_one(specs[i])
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=a.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {i: pool.submit(train_one, specs[i]) for i in order}
            results = {i: f.result() for i, f in futures.items()}
    res = [results[i] for i in range(len(specs))]
    wall = time.time() - start

    def loss(par: str, w: int, lr: float) -> float:
        return next(r.val_loss for r in res if (r.parametrization, r.width, r.lr) == (par, w, lr))

    header = ["LR"] + [f"{par} w={w}" for par in PARAMETRIZATIONS for w in widths]
    rows = [[f"{lr:.3g}"] + [_fmt_loss(loss(par, w, lr)) for par in PARAMETRIZATIONS for w in widths] for lr in lrs]
    import torch

    from bench.common import machine_line, print_table

    torch.set_num_threads(a.threads)  # so the machine line shows the runs' thread count
    print(machine_line())
    print_table(f"held-out loss after {a.steps} steps (lower is better)", header, rows)

    summary: dict[str, dict] = {}
    opt_rows = []
    for par in PARAMETRIZATIONS:
        opts = {}
        for w in widths:
            lr_opt, edge = optimum(lrs, [loss(par, w, lr) for lr in lrs])
            opts[w] = (lr_opt, edge)
            opt_rows.append([par, str(w), f"{lr_opt:.3g}" + (" (edge)" if edge else ""),
                             f"{math.log2(lr_opt):+.2f}" if math.isfinite(lr_opt) else "nan"])
        shift = math.log2(opts[widths[-1]][0] / opts[widths[0]][0])
        summary[par] = {"optimum": {str(w): v[0] for w, v in opts.items()},
                        "edge": {str(w): v[1] for w, v in opts.items()}, "shift_log2": shift}
    print_table("optimal LR (parabola in log2 LR through the best grid point and its neighbours)",
                ["parametrization", "width", "optimal LR", "log2"], opt_rows)
    sp, mup = summary["SP"]["shift_log2"], summary["MuP"]["shift_log2"]
    verdict = "MuP shifts less" if abs(mup) < abs(sp) else "MuP does NOT shift less"
    print(f"shift of the optimum from width {widths[0]} to {widths[-1]} (log2 units): SP {sp:+.2f}, MuP {mup:+.2f} "
          f"-> {verdict} ({wall:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"widths": widths, "lrs": lrs, "steps": a.steps, "runs": [asdict(r) for r in res],
                       "summary": summary, "seconds": wall}, f, indent=1)
    print(f"optimum_shift_log2 sp={sp:+.2f} mup={mup:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
