"""Numerical faults (megatron/observability/numerics.py): a NaN/Inf loss skips the optimizer step, is counted,
and training continues exactly as if that batch had been dropped; K in a row abort with a checkpoint."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from distributed import TINY_MODEL, make_dataset, read_metrics, run_trainer
from megatron.checkpoint.io import torch_load
from megatron.observability.numerics import NumericsGuard, parse_faults


def test_parse_faults():
    assert parse_faults("nan@3, inf@5,spike@7,drop@2") == {3: "nan", 5: "inf", 7: "spike", 2: "drop"}
    assert parse_faults("") == {}
    with pytest.raises(ValueError, match="bad entry 'zap@3'"):
        parse_faults("zap@3")


def test_parse_process_and_storage_faults():
    """kill/stop/enospc, and ``:r`` = on rank r only (tests/test_dist_faults.py, tests/test_checkpoint_io.py)."""
    spec = "kill@3:1,stop@4,enospc@6:0"
    assert parse_faults(spec) == {3: "kill", 4: "stop", 6: "enospc"}  # rank unknown: every entry
    assert parse_faults(spec, rank=0) == {4: "stop", 6: "enospc"}
    assert parse_faults(spec, rank=1) == {3: "kill", 4: "stop"}
    with pytest.raises(ValueError, match="bad entry 'kill@3:x'"):
        parse_faults("kill@3:x")


def test_inject_multiplies_only_the_marked_iteration():
    g = NumericsGuard(faults={2: "nan", 3: "inf", 4: "spike"})
    one = torch.tensor(1.5)
    assert g.inject(1, one).item() == 1.5
    assert torch.isnan(g.inject(2, one)) and torch.isinf(g.inject(3, one)) and g.inject(4, one).item() == 150.0


def test_drop_discards_the_batches_of_that_iteration():
    g = NumericsGuard(faults={3: "drop"})
    it = g.wrap_data(iter(range(100)), start_iteration=1, micro_batches=2)  # resumed after iteration 1
    # iteration 2 -> batches 0,1; iteration 3 dropped (2,3); iteration 3 trains on 4,5
    assert [next(it) for _ in range(6)] == [0, 1, 4, 5, 6, 7]


def test_skips_counted_in_a_row_and_abort(caplog):
    g = NumericsGuard(max_skipped=2)
    for it, (skipped, loss) in enumerate([(True, float("nan")), (False, 2.0), (True, float("inf"))], start=1):
        g._last_skipped = skipped
        assert g.end_iteration(it, loss) is False
    assert (g.skipped_in_a_row, g.skipped_total) == (1, 2)
    g._last_skipped = True
    assert g.end_iteration(4, float("nan")) is True  # the second in a row
    assert g.skipped_total == 3


def test_loss_spike_logged(caplog):
    """--loss-spike-factor F (NumericsGuard.spike_factor): a loss above F x its running mean is logged."""
    g = NumericsGuard(spike_factor=3.0)
    with caplog.at_level(logging.WARNING, logger="megatron.observability.numerics"):
        for it in range(1, 7):
            g.end_iteration(it, 2.0)
        assert not caplog.records
        g.end_iteration(7, 5.9)  # < 3 x 2.0
        assert not caplog.records
        g.end_iteration(8, 7.5)  # > 3 x running mean (2.39 after the 5.9)
    (rec,) = caplog.records
    assert "loss spike at iteration 8: 7.5000 > 3.0 x running mean 2.3900" in rec.getMessage()


# ------------------------------------------------------------------------------------------------ end to end
def trainer_args(data_list: str, out: str, iters: int, extra=()) -> list[str]:
    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(iters),
        # the LR depends on the number of applied updates only (warmup + decay fixed), not on --train-iters
        "--lr", "0.003", "--min-lr", "0.0003", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--lr-decay-iters", "10", "--clip-grad", "1.0", "--weight-decay", "0.1",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0", "--num-workers", "0",
        "--zero-stage", "1", "--deepspeed", "--seed", "1234", "--metrics-file", os.path.join(out, "metrics.jsonl"),
        *extra,
    ]


def records(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if "lm_loss" in r}


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("nan-data")), n_docs=120)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [(), ("--bf16", "--global-batch-size", "4")], ids=["fp32", "bf16"])
def test_nan_step_skipped_counted_and_equal_to_dropped_batch(data_list, tmp_path, dtype):
    """NaN at iteration 3 of 6 == a run whose batch 3 was dropped, stopped at 5 (losses shift by one).
    One rank: fp32 and bf16 run at ZeRO stage 0 (bf16: DeepSpeed's skip on a non-finite gradient norm)."""
    k, n = 3, 6
    nan_out, drop_out = str(tmp_path / "nan"), str(tmp_path / "drop")
    run_trainer(trainer_args(data_list, nan_out, n, dtype), env_extra={"MEGATRON_TEST_FAULTS": f"nan@{k}"})
    # same --train-iters (same data budget), stopped after n-1 iterations
    run_trainer(trainer_args(data_list, drop_out, n, (*dtype, "--exit-interval", str(n - 1))),
                env_extra={"MEGATRON_TEST_FAULTS": f"drop@{k}"})
    got, want = records(os.path.join(nan_out, "metrics.jsonl")), read_metrics(os.path.join(drop_out, "metrics.jsonl"))[0]
    assert sorted(got) == list(range(1, n + 1))  # training continued to the end
    assert [got[i]["nan_iterations"] for i in range(1, n + 1)] == [0, 0, 1, 0, 0, 0]
    assert [got[i]["skipped_iterations"] for i in range(1, n + 1)] == [0, 0, 1, 0, 0, 0]
    assert got[k]["lm_loss"] != got[k]["lm_loss"]  # NaN reported, not hidden
    for i in range(1, k):
        assert got[i]["lm_loss"] == pytest.approx(want[i], abs=1e-6)
    for i in range(k + 1, n + 1):  # the skipped step changed nothing: iteration i == dropped run's i-1
        assert got[i]["lm_loss"] == pytest.approx(want[i - 1], abs=1e-6), (i, got[i]["lm_loss"], want[i - 1])
    assert got[n]["lr"] == pytest.approx(records(os.path.join(drop_out, "metrics.jsonl"))[n - 1]
                                                    ["lr"], rel=1e-9)  # the LR schedule did not advance at the skip


@pytest.mark.slow
def test_k_skips_in_a_row_abort_with_checkpoint(data_list, tmp_path):
    out = str(tmp_path)
    ckpt = os.path.join(out, "ckpt")
    proc = run_trainer(trainer_args(data_list, out, 8, ("--save", ckpt, "--save-interval", "3", "--max-skipped-iterations", "2")),
                       check=False, env_extra={"MEGATRON_TEST_FAULTS": "nan@2,inf@4,nan@5,nan@6"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1 and "2 iterations in a row (up to 5) had a non-finite loss" in errors[0], errors
    assert "Traceback" not in proc.stderr
    got = records(os.path.join(out, "metrics.jsonl"))
    assert sorted(got) == [1, 2, 3, 4, 5]  # stopped at the second skip in a row (2 alone did not abort)
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == "global_step5"
    # the abort checkpoint holds the weights of the last good step (3, saved by --save-interval 3)
    good, last = (torch_load(os.path.join(ckpt, t, "mp_rank_00_model_states.pt"))["module"]
                  for t in ("global_step3", "global_step5"))
    assert sorted(good) == sorted(last)
    for name in good:
        assert torch.equal(good[name], last[name]), name
