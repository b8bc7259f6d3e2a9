"""LR range test: the sweep/smoothing/suggestion math against hand-computed values, the finder as a
scheduler + recorder, the argument handling, and an end-to-end --lr-finder run of the real trainer."""
from __future__ import annotations

import csv
import math
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest

from megatron.lr_finder import (
    CSV_NAME, NPZ_NAME, PNG_NAME, FinderSettings, LRFinder, smooth_losses, suggest_lr,
    sweep_lrs,
)


# ----------------------------------------------------------------------------- pure math
def test_sweep_is_geometric_from_min_to_max():
    lrs = sweep_lrs(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], 10.0, rtol=1e-12)  # (1e6)^(1/6) = 10
    np.testing.assert_allclose(sweep_lrs(1e-4, 1e-2, 3), [1e-4, 1e-3, 1e-2], rtol=1e-12)
    assert sweep_lrs(0.5, 2.0, 1).tolist() == [0.5]


def test_smoothing_is_the_bias_corrected_ema():
    # beta 0.98: a1 = 0.02*2 = 0.04 -> 0.04/0.02 = 2; a2 = 0.98*0.04 + 0.02*1 = 0.0592 -> 0.0592/0.0396
    got = smooth_losses([2.0, 1.0], beta=0.98)
    np.testing.assert_allclose(got, [2.0, 0.0592 / 0.0396], rtol=1e-12)
    # beta 0.5: a = 2, 2, 2.5 -> / (0.5, 0.75, 0.875) = 4, 8/3, 20/7
    np.testing.assert_allclose(smooth_losses([4.0, 2.0, 3.0], beta=0.5), [4.0, 8 / 3, 20 / 7], rtol=1e-12)
    # beta 0: no smoothing
    np.testing.assert_allclose(smooth_losses([3.0, 1.0, 2.0], beta=0.0), [3.0, 1.0, 2.0])


def test_suggestions_hand_computed():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    smoothed = [5.0, 4.5, 2.0, 1.9, 3.0]
    # d loss / d log10(lr) (np.gradient, spacing 1): [-0.5, -1.5, -1.3, 0.5, 1.1]; minimum loss at index 3,
    # steepest descent up to there at index 1.
    s = suggest_lr(lrs, smoothed)
    assert s.steepest_lr == pytest.approx(1e-3)
    assert s.min_loss_lr == pytest.approx(1e-1) and s.min_loss == pytest.approx(1.9)
    assert s.min_loss_lr_div10 == pytest.approx(1e-2)


def test_suggestion_ignores_a_diverged_tail_and_handles_monotone_curves():
    s = suggest_lr([1e-3, 1e-2, 1e-1, 1.0], [3.0, 2.0, float("nan"), float("inf")])
    assert s.min_loss_lr == pytest.approx(1e-2) and s.steepest_lr in (1e-3, 1e-2)
    rising = suggest_lr([1e-3, 1e-2, 1e-1], [1.0, 2.0, 3.0])  # minimum at the first LR
    assert rising.steepest_lr == pytest.approx(1e-3) and rising.min_loss_lr == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        suggest_lr([1e-3], [float("nan")])


# ----------------------------------------------------------------------------- the component
def fake_optimizer():
    return SimpleNamespace(param_groups=[{"lr_mult": 1.0, "wd_mult": 1.0}, {"lr_mult": 0.25, "wd_mult": 0.0}])


def test_finder_drives_every_group_and_records_the_lr_each_step_used(tmp_path):
    opt = fake_optimizer()
    f = LRFinder(opt, FinderSettings(num_steps=4, min_lr=1e-3, max_lr=1.0, weight_decay=0.1,
                                     out_dir=str(tmp_path)), write_outputs=False)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 0.25e-3])  # before step 1
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.1, 0.0])
    assert f.record(1, 5.0) is False and f.raw_losses == []  # no optimizer step yet: nothing recorded
    f.step(increment=8)  # what DeepSpeed calls after the optimizer step
    assert f.record(1, 5.0) is False
    assert f.recorded_lrs == pytest.approx([1e-3])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2, 0.25e-2])
    assert f.record(2, 4.0) is False  # skipped step (no scheduler.step): not recorded, LR not advanced
    assert len(f.raw_losses) == 1 and f.get_lr() == pytest.approx(1e-2)
    for it, loss in ((2, 4.0), (3, 3.0), (4, 3.5)):
        f.step(8)
        stop = f.record(it, loss)
    assert stop and "reached --lr-finder-max" in f.stop_reason
    assert f.recorded_lrs == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])
    np.testing.assert_allclose(f.smoothed, smooth_losses([5.0, 4.0, 3.0, 3.5], 0.98), rtol=1e-12)
    assert f.state_dict()["num_steps"] == 4
    f.load_state_dict({"num_steps": 99})  # a checkpoint's scheduler state does not move the sweep
    assert f.num_steps == 4


def test_early_stop_when_smoothed_loss_exceeds_factor_times_best(tmp_path):
    f = LRFinder(fake_optimizer(), FinderSettings(num_steps=100, beta=0.0, stop_factor=4.0, out_dir=str(tmp_path)),
                 write_outputs=False)
    losses = [2.0, 1.0, 3.9, 4.1]  # beta 0: smoothed = raw; best 1.0 -> stops when > 4.0
    stops = []
    for i, x in enumerate(losses, 1):
        f.step(1)
        stops.append(f.record(i, x))
    assert stops == [False, False, False, True] and "exceeded 4" in f.stop_reason
    g = LRFinder(fake_optimizer(), FinderSettings(num_steps=100, out_dir=str(tmp_path)), write_outputs=False)
    g.step(1)
    assert g.record(1, 2.0) is False
    g.step(1)
    assert g.record(2, float("nan")) is True and "not finite" in g.stop_reason


def test_finish_writes_csv_npz_png(tmp_path, capsys):
    f = LRFinder(fake_optimizer(), FinderSettings(num_steps=5, min_lr=1e-4, max_lr=1.0, out_dir=str(tmp_path)))
    for i, x in enumerate([5.0, 4.5, 2.0, 1.9, 3.0], 1):
        f.step(1)
        f.record(i, x)
    sg = f.finish()
    assert f.finish() is sg  # idempotent
    with open(tmp_path / CSV_NAME) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["learning_rate", "loss", "raw_loss", "iteration"]
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx(sweep_lrs(1e-4, 1.0, 5).tolist())
    assert [float(r["raw_loss"]) for r in rows] == [5.0, 4.5, 2.0, 1.9, 3.0]
    npz = np.load(tmp_path / NPZ_NAME)
    np.testing.assert_allclose(npz["losses"], smooth_losses([5.0, 4.5, 2.0, 1.9, 3.0]), rtol=1e-12)
    assert float(npz["suggested_lr_steepest"]) == pytest.approx(sg.steepest_lr)
    assert (tmp_path / PNG_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "steepest descent" in out and "min-loss LR / 10" in out


# ----------------------------------------------------------------------------- arguments
def finder_args(tmp_path, *extra):
    from distributed import TINY_MODEL
    from megatron.arguments import parse_args

    data_list = tmp_path / "list.txt"
    data_list.write_text("1.0 /nonexistent/prefix corpus\n")
    return parse_args(TINY_MODEL + ["--data-file-list", str(data_list), "--train-iters", "30", "--lr", "1e-3",
                                    "--lr-finder", *extra], env={})


def test_arguments_send_outputs_to_save_lr_finder_and_drop_the_checkpoint(tmp_path):
    a = finder_args(tmp_path, "--save", str(tmp_path / "ckpt"), "--eval-iters", "5")
    assert a.lr_finder_dir == str(tmp_path / "ckpt" / "lr_finder")
    assert a.save is None and a.save_interval is None and a.eval_iters == 0
    assert a.metrics_file == str(tmp_path / "ckpt" / "lr_finder" / "metrics.jsonl")
    assert (a.lr_finder_min, a.lr_finder_max, a.lr_finder_fraction, a.lr_finder_stop_factor) == (1e-6, 1.0, 1.0, 4.0)


@pytest.mark.parametrize("extra,message", [
    (("--lr-finder-min", "1.0", "--lr-finder-max", "0.1"), "0 < min < max"),
    (("--lr-finder-fraction", "0"), "--lr-finder-fraction must be in (0, 1]"),
    (("--lr-finder-fraction", "0.05"), "at least 2 steps"),
    (("--lr-finder-stop-factor", "1"), "--lr-finder-stop-factor must be > 1"),
])
def test_bad_finder_flags_are_refused(tmp_path, extra, message):
    from megatron.arguments import ArgumentError

    with pytest.raises(ArgumentError, match=re.escape(message)):
        finder_args(tmp_path, *extra)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_lr_finder_end_to_end(tmp_path):
    """30-step sweep of the tiny model through the real trainer, then a short run at the suggestion."""
    from distributed import TINY_MODEL, make_dataset, read_metrics, run_trainer

    data_list = make_dataset(str(tmp_path / "data"))
    save = tmp_path / "ckpt"
    common = TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", str(tmp_path / "cache"),
        "--micro-batch-size", "4", "--global-batch-size", "8", "--lr-decay-style", "constant",
        "--adam-beta2", "0.95", "--log-interval", "5", "--eval-interval", "1000", "--eval-iters", "2",
        "--num-workers", "0", "--zero-stage", "1", "--deepspeed", "--seed", "1234"]
    proc = run_trainer(common + ["--train-iters", "30", "--lr", "0.0002", "--save", str(save), "--lr-finder"])
    out_dir = save / "lr_finder"
    assert sorted(os.listdir(save)) == ["lr_finder"]  # no checkpoint, no latest/ global_step*
    assert {CSV_NAME, NPZ_NAME, PNG_NAME} <= set(os.listdir(out_dir))

    with open(out_dir / CSV_NAME) as fh:
        rows = list(csv.DictReader(fh))
    lrs = np.array([float(r["learning_rate"]) for r in rows])
    assert 5 <= len(lrs) <= 30
    assert lrs[0] == pytest.approx(1e-6)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], (1.0 / 1e-6) ** (1 / 29), rtol=1e-9)
    assert [int(r["iteration"]) for r in rows] == list(range(1, len(rows) + 1))
    npz = np.load(out_dir / NPZ_NAME)
    np.testing.assert_allclose(npz["learning_rates"], lrs, rtol=1e-12)
    np.testing.assert_allclose(npz["losses"], smooth_losses(npz["raw_losses"], 0.98), rtol=1e-9)
    # the training loss logged by the trainer is the loss the finder recorded
    train_losses, val = read_metrics(str(out_dir / "metrics.jsonl"))
    assert val == []
    for it, logged in train_losses.items():  # log interval 5: the mean of the window's losses
        if it % 5 == 0 and it <= len(rows):
            assert logged == pytest.approx(float(np.mean(npz["raw_losses"][it - 5:it])), rel=1e-6)
    assert (out_dir / PNG_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    m = re.search(r"suggested LR \(steepest descent of the smoothed loss\) = ([0-9.e+-]+)", proc.stdout)
    m10 = re.search(r"suggested LR \(min-loss LR / 10\) = ([0-9.e+-]+)", proc.stdout)
    assert m and m10, proc.stdout[-3000:]
    steep, div10 = float(m.group(1)), float(m10.group(1))
    assert lrs[0] * 0.999 <= steep <= lrs[-1] * 1.001
    assert steep == pytest.approx(float(npz["suggested_lr_steepest"]), rel=1e-3)
    assert lrs[0] / 10 <= div10 <= lrs[-1]

    # the suggestion trains the same model without diverging
    out2 = tmp_path / "run2"
    run_trainer(common + ["--train-iters", "10", "--lr", f"{div10:.6g}", "--log-interval", "1",
                          "--metrics-file", str(out2 / "metrics.jsonl")])
    losses, _ = read_metrics(str(out2 / "metrics.jsonl"))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[10] < losses[1]
