"""--log-params-norm and --log-num-zeros-in-grad (megatron/observability/weight_stats.py) against independent values,
in every layout that splits the model differently: 1 rank at ZeRO 0 (the reference), 2 ranks at
ZeRO-2 (DeepSpeed's fp32 gradient partitions), ZeRO-3 (partitioned weights) and TP=2 (split and
replicated tensors).

* params norm: the fp64 norm of the weights the reference run saved after its last step, and the
  same value (<= 1e-6 relative: the runs' float sums differ) from every layout;
* zeros in the gradient: with untied embeddings, the only exact zeros of the gradient are the
  embedding rows of the vocabulary ids absent from the iteration's global batch, so
  num_zeros = hidden x (padded vocabulary - distinct input tokens of the batch), counted from the
  batch itself; every layout gives exactly that count.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from distributed import TINY_MODEL, make_dataset, run_trainer

ITERS, MB, GBS, HIDDEN, PADDED_VOCAB = 2, 4, 8, 64, 512
LAYOUTS = {"zero2": (2, ["--zero-stage", "2"]), "zero3": (2, ["--zero-stage", "3"]),
           "tp2": (2, ["--zero-stage", "1", "--tensor-model-parallel-size", "2"])}


def trainer_args(data_list: str, out: str, extra=()) -> list[str]:
    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", str(MB), "--global-batch-size", str(GBS), "--train-iters", str(ITERS),
        "--lr", "0.003", "--lr-decay-style", "constant", "--log-interval", "1", "--eval-interval", "1000",
        "--eval-iters", "0", "--num-workers", "0", "--deepspeed", "--seed", "1234", "--peak-tflops", "1",
        "--log-params-norm", "--log-num-zeros-in-grad", "--metrics-file", os.path.join(out, "metrics.jsonl"), *extra]


def records(out: str) -> dict[int, dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if "lm_loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight-stats")
    data_list = make_dataset(str(root / "data"))
    out = {}
    ref = str(root / "ref")
    proc = run_trainer(trainer_args(data_list, ref, ["--zero-stage", "0", "--save", os.path.join(ref, "ckpt")]))
    out["ref"] = (records(ref), proc.stdout)
    for name, (nproc, extra) in LAYOUTS.items():
        d = str(root / name)
        proc = run_trainer(trainer_args(data_list, d, extra), nproc=nproc, launcher="ranks")
        out[name] = (records(d), proc.stdout)
    return data_list, ref, out


def batch_tokens(data_list: str, ref: str, iteration: int) -> torch.Tensor:
    """The input tokens of `iteration`'s global batch, read from the dataset the trainer built."""
    from megatron.arguments import parse_args
    from megatron.config import Config
    from megatron.training import build_datasets

    args = parse_args(trainer_args(data_list, ref, ["--zero-stage", "0"]), env={})
    train_ds, _, _ = build_datasets(Config.from_args(args))
    rows = [torch.as_tensor(train_ds[i]["text"]) for i in range((iteration - 1) * GBS, iteration * GBS)]
    return torch.stack(rows)[:, :-1]


@pytest.mark.slow
def test_params_norm_is_the_norm_of_the_saved_weights(runs):
    _, ref, out = runs
    got, stdout = out["ref"]
    module = torch.load(os.path.join(ref, "ckpt", f"global_step{ITERS}", "mp_rank_00_model_states.pt"),
                        map_location="cpu", weights_only=False)["module"]
    want = sum(float(t.double().square().sum()) for t in module.values() if t.is_floating_point()) ** 0.5
    assert got[ITERS]["params_norm"] == pytest.approx(want, rel=1e-12)
    line = [ln for ln in stdout.splitlines() if ln.startswith(f" iteration={ITERS:8d}")][0]
    assert f"params_norm={want:.6f} |" in line and f"num_zeros={got[ITERS]['num_zeros']} |" in line


@pytest.mark.slow
def test_num_zeros_counts_the_absent_embedding_rows(runs):
    data_list, ref, out = runs
    got, _ = out["ref"]
    for it in range(1, ITERS + 1):
        distinct = batch_tokens(data_list, ref, it).unique().numel()
        assert got[it]["num_zeros"] == HIDDEN * (PADDED_VOCAB - distinct), it


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_reference_values(runs, layout):
    _, _, out = runs
    want, got = out["ref"][0], out[layout][0]
    for it in range(1, ITERS + 1):
        assert got[it]["num_zeros"] == want[it]["num_zeros"], (layout, it)
        assert got[it]["params_norm"] == pytest.approx(want[it]["params_norm"], rel=1e-6), (layout, it)


def test_one_host_read_per_statistic_not_per_tensor(host_reads):
    """Each statistic reads the host once (its local sum; with several ranks once more for the world sum,
    here one process), whatever the number of tensors (each read waits for a GPU/XPU; the old loop made one
    per tensor), and gives the bits of the float sums on the host, tensor after tensor."""
    from megatron.observability.weight_stats import num_zeros_in_grad, params_norm

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(5, 5) for _ in range(4)))
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g)
        p.grad = torch.randn(p.shape, generator=g).relu()  # about half exact zeros
    want_norm = 0.0
    want_zeros = 0
    for p in model.parameters():
        want_norm += float(p.detach().double().square().sum())
        want_zeros += int((p.grad == 0).sum())
    host_reads.clear()
    assert params_norm(model) == want_norm ** 0.5
    assert host_reads == ["tolist"]
    host_reads.clear()
    assert num_zeros_in_grad(model) == want_zeros > 0
    assert host_reads == ["tolist"]
