"""What a run prints and writes, checked against independently computed values.

One short 2-rank ZeRO-2 run (6 iterations, log every 2, evaluate every 3, --peak-tflops given,
optimizer-state statistics, timers, torch profiler, DeepSpeed flops profiler, W&B offline when
wandb is installed); the tests read its console output, TensorBoard events (with tensorboard's
own reader), metrics.jsonl, checkpoint and traces.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import re
import sys
import types

import pytest
import torch

from distributed import TINY_MODEL, make_dataset, run_trainer
from megatron.config import Config, default_args

ITERS, LOG, EVAL, GBS, MB, SEQ, WORLD, PEAK = 6, 2, 3, 8, 4, 32, 2, 0.05
MAX_LR, MIN_LR, WARMUP = 0.003, 0.0003, 2
# Megatron-LM formula by hand for TINY_MODEL: B=8, s=32, L=2, h=64, ffn=128 (swiglu), 4 heads / 2 kv,
# vocab 500 padded to 512: 12*8*32*2*64^2 * (1 + 2*1.5 + 2/4 + 32/64 + 512/(2*2*64)) = 25165824 * 7
FLOPS_PER_ITER = 176_160_768

HAVE_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("obs"))
    data_list = make_dataset(os.path.join(out, "data"))
    args = TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", str(MB), "--global-batch-size", str(GBS), "--train-iters", str(ITERS),
        "--lr", str(MAX_LR), "--min-lr", str(MIN_LR), "--lr-decay-style", "cosine", "--lr-warmup-iters", str(WARMUP),
        "--log-interval", str(LOG), "--eval-interval", str(EVAL), "--eval-iters", "2", "--num-workers", "0",
        "--zero-stage", "2", "--deepspeed", "--save", os.path.join(out, "ckpt"), "--peak-tflops", str(PEAK),
        "--log-optimizer-states-to-tensorboard", "--log-timers-to-tensorboard", "--timing-log-level", "2",
        "--profile", "pt", "--profile_steps", "2,3", "--trace-dir", os.path.join(out, "trace"),
        "--flops-profiler-step", "2", "--wandb-save-dir", os.path.join(out, "wandb"),
        "--log-memory-to-tensorboard", "--log-validation-ppl-to-tensorboard",
    ]
    proc = run_trainer(args, nproc=WORLD, launcher="mpiexec",
                       env_extra={"WANDB_MODE": "offline" if HAVE_WANDB else "disabled", "WANDB_SILENT": "true"})
    return out, proc.stdout


def parse_lines(stdout: str) -> list[dict]:
    rows = []
    for line in stdout.splitlines():
        if not line.startswith(" iteration="):
            continue
        fields = {}
        for part in line.strip().strip("|").split("|"):
            k, v = part.split("=", 1)
            fields[k.strip()] = v.strip()
        rows.append(fields)
    return rows


def expected_lr(it: int) -> float:
    """LR after `it` iterations: linear warmup over 2 iterations, then cosine to MIN_LR at ITERS."""
    if it <= WARMUP:
        return MAX_LR * it / WARMUP
    r = (it - WARMUP) / (ITERS - WARMUP)
    return MIN_LR + (MAX_LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * r))


def metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "ckpt", "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]



@pytest.mark.slow
def test_console_line_every_field(run):
    out, stdout = run
    rows = parse_lines(stdout)
    assert [int(r["iteration"].split("/")[0]) for r in rows] == [2, 4, 6]
    train = {r["iteration"]: r for r in metrics(out) if "lm_loss" in r}
    assert list(rows[0]) == [
        "iteration", "consumed_samples", "consumed_tokens", "elapsed_time_per_iteration_ms", "learning_rate",
        "global_batch_size", "lm loss", "loss_scale", "grad_norm", "actual_seqlen", "number_of_skipped_iterations",
        "number_of_nan_iterations", "samples_per_second", "tokens_per_gpu_per_second_tgs", "TFLOPs", "MFU", "ETA"]
    for r in rows:
        it, total = (int(x) for x in r["iteration"].split("/"))
        assert total == ITERS
        assert int(r["consumed_samples"]) == it * GBS
        assert int(r["consumed_tokens"]) == it * GBS * SEQ
        assert int(r["global_batch_size"]) == GBS and int(r["actual_seqlen"]) == SEQ
        assert float(r["learning_rate"]) == pytest.approx(expected_lr(it), rel=1e-6)
        assert float(r["loss_scale"]) == 1.0
        assert int(r["number_of_skipped_iterations"]) == 0 and int(r["number_of_nan_iterations"]) == 0
        # the printed loss is the mean of the interval's per-iteration losses
        assert float(r["lm loss"]) == pytest.approx(sum(train[it]["losses"]) / LOG, abs=2e-6)
        assert 0 < float(r["grad_norm"]) < 100
        sec = float(r["elapsed_time_per_iteration_ms"]) / 1e3  # printed to 0.1 ms
        rel = 0.06e-3 / sec + 1e-3
        assert float(r["samples_per_second"]) == pytest.approx(GBS / sec, rel=rel)
        assert float(r["tokens_per_gpu_per_second_tgs"]) == pytest.approx(GBS * SEQ / sec / WORLD, rel=rel)
        tflops = FLOPS_PER_ITER / sec / 1e12 / WORLD
        assert float(r["TFLOPs"]) == pytest.approx(tflops, rel=rel)
        mfu = 100 * tflops / PEAK  # printed to 0.01 %: its rounding adds to the time's
        assert abs(float(r["MFU"].rstrip("%")) - mfu) <= 0.005 + rel * mfu
        h, m, s = (int(x) for x in r["ETA"].split(":"))
        assert abs(3600 * h + 60 * m + s - (ITERS - it) * sec) <= 0.51


@pytest.mark.slow
def test_timers_block_and_summary_table(run):
    _, stdout = run
    blocks = stdout.split("(min, max) time across ranks (ms):")[1:]
    assert len(blocks) == ITERS // LOG
    for name in ("forward-backward", "optimizer", "batch-generator", "forward-compute", "backward-compute"):
        m = re.search(rf"    {name} \.+: \(([\d.]+), ([\d.]+)\)", blocks[0])
        assert m and 0 <= float(m.group(1)) <= float(m.group(2)), name
    summary = stdout[stdout.index("| run summary"):]
    for label in ("iterations", "tokens", "time", "mean tokens/s", "mean TFLOPS/device", "model compute", "MFU",
                  "final train loss",
                  "final val loss (PPL)", "checkpoint", "tensorboard", "metrics"):
        assert re.search(rf"^\| {re.escape(label)} +\| ", summary, re.M), label
    assert f"{ITERS * GBS * SEQ:,}" in summary and "global_step6" in summary
    assert re.search(r"^\| precision +\| fp32 +\|$", summary, re.M)  # no --bf16/--fp16
    assert f"| model compute        | {ITERS * FLOPS_PER_ITER / 1e12:.4g} TFLOP ({ITERS} iterations x 0.1762 GFLOP)" in summary


def tb_scalars(out: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "ckpt", "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_scalars_and_point_counts(run):
    out, stdout = run
    tb = tb_scalars(out)
    rows = parse_lines(stdout)
    reports = [LOG * k for k in range(1, ITERS // LOG + 1)]
    per_iter = {r["iteration"]: r for r in metrics(out) if "lm_loss" in r}
    losses = [x for it in reports for x in per_iter[it]["losses"]]
    assert [s for s, _ in tb["lm-loss-training/lm loss"]] == list(range(1, ITERS + 1))
    assert [v for _, v in tb["lm-loss-training/lm loss"]] == pytest.approx(losses, rel=1e-6)
    assert [s for s, _ in tb["lm-loss-training/lm loss vs tokens"]] == [i * GBS * SEQ for i in range(1, ITERS + 1)]
    assert [s for s, _ in tb["learning-rate/learning-rate"]] == reports
    assert [v for _, v in tb["learning-rate/learning-rate"]] == pytest.approx([expected_lr(i) for i in reports], rel=1e-6)
    for tag in ("training/grad-norm", "throughput/tokens_per_sec", "throughput/tokens_per_gpu_per_sec",
                "throughput/samples_per_sec", "throughput/tflops", "throughput/mfu", "memory/max_rss_gb",
                "optimizer/weight_l2", "optimizer/momentum_l2", "optimizer/variance_l2", "timers/forward-backward"):
        assert [s for s, _ in tb[tag]] == reports, tag
    for (_, mfu), (_, tf) in zip(tb["throughput/mfu"], tb["throughput/tflops"]):
        assert mfu == pytest.approx(tf / PEAK, rel=1e-5)
    assert [float(r["TFLOPs"]) for r in rows] == pytest.approx([v for _, v in tb["throughput/tflops"]], rel=1e-3)
    assert all(0.01 < v < 100 for _, v in tb["memory/max_rss_gb"])
    val = tb["lm-loss-validation/lm loss validation"]
    assert [s for s, _ in val] == [3, 6]
    assert [s for s, _ in tb["lm-loss-validation/lm loss validation vs tokens"]] == [3 * GBS * SEQ, 6 * GBS * SEQ]
    assert [v for _, v in tb["lm-loss-validation/lm loss validation ppl"]] == pytest.approx(
        [math.exp(v) for _, v in val], rel=1e-5)


@pytest.mark.slow
def test_optimizer_state_statistics_equal_norms_of_the_saved_state(run):
    """The statistics logged at iteration 6 against the ZeRO-2 shards saved at iteration 6 (both ranks)."""
    out, _ = run
    tb = tb_scalars(out)
    step_dir = os.path.join(out, "ckpt", "global_step6")
    m, v, w = [], [], []
    for r in range(WORLD):
        sd = torch.load(os.path.join(step_dir, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"), map_location="cpu",
                        weights_only=False)["optimizer_state_dict"]
        for st in sd["base_optimizer_state"]["state"].values():
            m.append(st["exp_avg"].flatten())
            v.append(st["exp_avg_sq"].flatten())
        w += [t.flatten() for t in sd["single_partition_of_fp32_groups"]]
    m, v, w = (torch.cat(x).detach().double() for x in (m, v, w))
    model = torch.load(os.path.join(step_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                       weights_only=False)["module"]
    weights = torch.cat([t.flatten().double() for t in model.values()])
    want = {"weight": weights, "momentum": m, "variance": v, "variance_sqrt": v.sqrt()}
    assert float(w.norm()) == pytest.approx(float(weights.norm()), rel=1e-6)  # shards hold exactly the model
    for name, t in want.items():
        got = {stat: tb[f"optimizer/{name}_{stat}"][-1] for stat in ("l2", "l1", "abs_max")}
        assert all(step == ITERS for step, _ in got.values())
        assert got["l2"][1] == pytest.approx(float(t.norm()), rel=1e-5), name
        assert got["l1"][1] == pytest.approx(float(t.abs().sum()), rel=1e-5), name
        assert got["abs_max"][1] == pytest.approx(float(t.abs().max()), rel=1e-5), name
        assert got["l2"][1] > 0, name


@pytest.mark.slow
def test_metrics_jsonl_corpus_counts_and_summary(run):
    out, _ = run
    recs = metrics(out)
    train = [r for r in recs if "lm_loss" in r]
    val = [r for r in recs if "val_loss" in r]
    summary = [r["summary"] for r in recs if "summary" in r]
    assert [r["iteration"] for r in train] == [2, 4, 6] and [r["iteration"] for r in val] == [3, 6]
    for r in train:  # every sample the ranks drew is counted under its corpus, across both ranks
        assert r["corpus_samples"] == {"toy": r["consumed_samples"]}
        assert r["mfu"] == pytest.approx(r["tflops"] / PEAK)
        assert r["tflops"] == pytest.approx(FLOPS_PER_ITER / (r["ms_per_iter"] / 1e3) / 1e12 / WORLD)
    assert len(summary) == 1 and summary[0]["checkpoint"].endswith("global_step6")


@pytest.mark.slow
def test_torch_profiler_trace_and_deepspeed_flops_profile(run):
    out, _ = run
    with open(os.path.join(out, "trace", "trace-rank0-iters2-3.json")) as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::matmul" in names or "aten::linear" in names
    assert not os.path.exists(os.path.join(out, "trace", "trace-rank1-iters2-3.json"))  # --profile-ranks 0
    with open(os.path.join(out, "trace", "flops-profile-step2.txt")) as f:
        text = f.read()
    assert "Profile Summary at step 2" in text
    # DeepSpeed counts the forward FLOPs itself: 3 x forward (fwd + bwd) x data-parallel ranks = Megatron's formula
    fwd = re.search(r"fwd flops per GPU:\s+([\d.]+) M", text)
    assert fwd and 3 * float(fwd.group(1)) * 1e6 * WORLD == pytest.approx(FLOPS_PER_ITER, rel=0.01)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WANDB, reason="wandb not installed")
def test_wandb_offline_records_the_tensorboard_keys(run):
    from wandb.proto import wandb_internal_pb2 as pb

    out, _ = run
    path = glob.glob(os.path.join(out, "wandb", "wandb", "offline-run-*", "run-*.wandb"))
    assert len(path) == 1
    keys, steps = set(), []
    for data in _leveldb_log_records(path[0]):
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            steps.append(items["_step"])
            keys |= set(items)
    tb_keys = {k for k in tb_scalars(out) if " vs " not in k}
    assert tb_keys <= keys, tb_keys - keys
    assert steps == list(range(1, ITERS + 1))


def _leveldb_log_records(path: str):
    """Records of a W&B transaction log (LevelDB log format after a 7-byte ':W&B' header)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            yield buf
            buf = b""


# ----------------------------------------------------------------------------- fast unit tests
def test_format_duration():
    from megatron.observability.training_log import format_duration

    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(100 * 3600) == "100:00:00"
    assert format_duration(float("nan")) == "?"


def test_memory_stats_on_cpu_reports_resident_memory():
    from megatron.observability.training_log import memory_stats

    import mmap

    before = memory_stats("cpu")
    # 64 MiB of fresh anonymous pages, touched (a tensor could reuse heap memory freed by earlier tests,
    # and then the resident size would not grow)
    x = mmap.mmap(-1, 64 * 1024 * 1024)
    x.write(b"\x01" * len(x))
    after = memory_stats("cpu")
    assert after["rss_gb"] - before["rss_gb"] == pytest.approx(1 / 16, abs=0.02)
    assert after["max_rss_gb"] >= after["rss_gb"] - 0.01
    x.close()


def test_wandb_absent_or_disabled_gives_no_run(monkeypatch):
    from megatron.observability.wandb_utils import init_wandb, wandb_project

    config = Config.from_args(default_args(rank=0, wandb_project=None, wandb_exp_name=None, wandb_save_dir=None,
                                           save=None))
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert init_wandb(config, env={}) is None
    monkeypatch.delitem(sys.modules, "wandb")
    assert init_wandb(config, env={"WANDB_MODE": "disabled"}) is None
    assert init_wandb(Config.from_args(default_args(rank=1)), env={}) is None
    assert wandb_project(config.logging, env={"WB_PROJECT": "a", "WANDB_PROJECT": "b"}) == "a"
    assert wandb_project(config.logging, env={"WANDB_PROJECT": "b"}) == "b"
    assert wandb_project(config.logging, env={}) == "AuroraGPT"


def test_wandb_installed_but_not_logged_in_is_not_used(monkeypatch, tmp_path):
    """No login and no WANDB_MODE: no run, no files, no prompt."""
    from megatron.observability.wandb_utils import init_wandb

    fake = types.SimpleNamespace(Api=lambda: types.SimpleNamespace(api_key=None),
                                 init=lambda **kw: pytest.fail("wandb.init must not be called"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = Config.from_args(default_args(rank=0, wandb_project=None, wandb_exp_name=None,
                                           wandb_save_dir=str(tmp_path), save=None))
    assert init_wandb(config, env={}) is None
    assert os.listdir(tmp_path) == []


def test_metrics_file_replaced_by_a_fresh_run_and_appended_on_resume(tmp_path):
    """A run from iteration 0 starts a new metrics.jsonl (re-running the demo must not mix two runs);
    a resumed run appends to it."""
    from megatron.observability.training_log import TrainLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 30, "lm_loss": 1.0}\n')
    args = default_args(rank=0, world_size=1, tensorboard_dir=None, metrics_file=str(path), peak_tflops=1.0,
                              device_type="cpu", params_dtype="fp32", timing_log_level=0, timing_log_option="minmax",
                              wandb_project=None)
    TrainLogger.create(Config.from_args(args), resumed=True).metrics.close()
    assert path.read_text().count("\n") == 1
    TrainLogger.create(Config.from_args(args), resumed=False).metrics.close()
    assert path.read_text() == ""


def test_summary_prints_the_model_compute_of_the_iterations_trained(tmp_path):
    """The summary's `model compute` row (also in metrics.jsonl's summary record) = the Megatron-LM formula
    times the iterations this run trained, against values worked out by hand for the 7M demo shape."""
    from megatron.observability.training_log import TrainLogger

    path = tmp_path / "metrics.jsonl"
    args = default_args(rank=0, world_size=1, tensorboard_dir=None, metrics_file=str(path), peak_tflops=1.0,
                        device_type="cpu", params_dtype="fp32", timing_log_level=0, timing_log_option="minmax",
                        wandb_project=None, global_batch_size=4, seq_length=256, num_layers=4, hidden_size=256,
                        ffn_hidden_size=704, padded_vocab_size=8192, swiglu=True, num_attention_heads=4,
                        num_key_value_heads=2)
    # 12*4*256*4*256^2 * (1 + (704/256)*1.5 + 2/4 + 256/256 + 8192/(2*4*256)) = 3,221,225,472 * 10.625
    per_iteration = 34_225_520_640
    for trained, want in ((400, "13.69 TFLOP (400 iterations x 34.23 GFLOP)"),  # 13,690,208,256,000 FLOPs
                          (150, "5.134 TFLOP (150 iterations x 34.23 GFLOP)")):  # a resumed run: its own iterations
        logger = TrainLogger.create(Config.from_args(args))
        logger.totals.iterations, logger.totals.train_seconds = trained, 10.0
        rows = dict(logger.summary_rows(400, 400 * 4 * 256, None))
        assert rows["model compute"] == want
        assert float(rows["mean TFLOPS/device"]) == pytest.approx(per_iteration * trained / 10.0 / 1e12, rel=1e-3)
        logger.finish(400, 400 * 4 * 256, None)
        (record,) = [json.loads(line) for line in path.read_text().splitlines() if "summary" in line]
        assert record["summary"]["model compute"] == want


# ----------------------------------------------------------------------------- TensorBoard flags, one each
class _Writer:
    def __init__(self):
        self.steps: dict[str, list[int]] = {}

    def add_scalar(self, key, value, step):
        self.steps.setdefault(key, []).append(step)

    def close(self):
        pass


def _logged_tags(flags: list[str]) -> dict[str, list[int]]:
    """Tags and steps a TrainLogger writes for 4 iterations (log every 2) and one evaluation."""
    from megatron.arguments import parse_args
    from megatron.observability.training_log import TrainLogger

    args = parse_args(TINY_MODEL + ["--lr", "0.1", "--train-iters", "4", "--log-interval", "2", "--data-path", "x",
                                    *flags], env={})
    args.rank, args.padded_vocab_size = 0, 512
    logger = TrainLogger(Config.from_args(args), writer=_Writer())
    engine = types.SimpleNamespace(lr_scheduler=types.SimpleNamespace(get_lr=lambda: 0.1), skipped_steps=0,
                                   get_global_grad_norm=lambda: 1.0, optimizer=None, module=torch.nn.Linear(2, 2))
    for it in range(1, 5):
        logger.train(it, torch.tensor(2.0), engine, it * args.global_batch_size, it * args.global_batch_size * 32)
    logger.validation(4, 1.5, 4 * 32)
    return logger.writer.steps


@pytest.mark.parametrize("flag,tag,when_given", [
    ("--log-memory-to-tensorboard", "memory/max_rss_gb", True),
    ("--log-validation-ppl-to-tensorboard", "lm-loss-validation/lm loss validation ppl", True),
    ("--log-batch-size-to-tensorboard", "training/batch-size", True),
    ("--log-world-size-to-tensorboard", "training/world-size", True),
    ("--no-log-learnig-rate-to-tensorboard", "learning-rate/learning-rate", False),
    ("--no-log-loss-scale-to-tensorboard", "loss/loss_scale", False),
])
def test_tensorboard_flag_adds_or_removes_its_scalar(flag, tag, when_given):
    assert (tag in _logged_tags([flag])) == when_given
    assert (tag in _logged_tags([])) == (not when_given)


def test_tensorboard_log_interval_and_queue_size(tmp_path):
    assert _logged_tags([])["lm-loss-training/lm loss"] == [1, 2, 3, 4]
    assert _logged_tags(["--tensorboard-log-interval", "2"])["lm-loss-training/lm loss"] == [2, 4]
    from megatron.arguments import parse_args
    from megatron.observability.training_log import TrainLogger

    args = parse_args(TINY_MODEL + ["--lr", "0.1", "--train-iters", "4", "--data-path", "x", "--peak-tflops", "1",
                                    "--tensorboard-dir", str(tmp_path), "--tensorboard-queue-size", "7"], env={})
    args.rank = 0
    logger = TrainLogger.create(Config.from_args(args))
    assert logger.writer.max_queue == 7
    logger.close()


def test_wandb_disabled_env_var(monkeypatch, tmp_path):
    """WANDB_DISABLED=true (the name upstream's docs give) turns W&B off like WANDB_MODE=disabled."""
    from megatron.observability.wandb_utils import init_wandb

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: types.SimpleNamespace(name="run", settings=kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = Config.from_args(default_args(rank=0, wandb_project=None, wandb_exp_name=None,
                                           wandb_save_dir=str(tmp_path), save=None))
    assert init_wandb(config, env={"WANDB_MODE": "offline"}) is not None
    for value in ("true", "1", "yes"):
        assert init_wandb(config, env={"WANDB_MODE": "offline", "WANDB_DISABLED": value}) is None
    assert init_wandb(config, env={"WANDB_MODE": "offline", "WANDB_DISABLED": "false"}) is not None


def test_dump_tokens(monkeypatch, capsys):
    """DUMP_TOKENS (upstream's debug variable): rank 0 prints the first 10 samples of every micro-batch of the
    first 10 iterations; the batches pass through unchanged."""
    from megatron.arguments import parse_args
    from megatron.observability.training_log import TrainLogger

    args = parse_args(TINY_MODEL + ["--lr", "0.1", "--train-iters", "20", "--data-path", "x", "--peak-tflops", "1",
                                    "--micro-batch-size", "12", "--global-batch-size", "24"], env={})
    args.rank = 0
    batches = [{"text": torch.arange(12 * 3).reshape(12, 3) + 100 * k} for k in range(30)]  # 2 per iteration
    for value, printed in (("1", 20), ("", 0)):
        monkeypatch.setenv("DUMP_TOKENS", value)
        logger = TrainLogger.create(Config.from_args(args))
        assert list(logger.count_corpora(iter(batches))) == batches
        logger.close()
        lines = [ln for ln in capsys.readouterr().out.splitlines() if "DUMP_TOKENS" in ln]
        assert len(lines) == printed
    assert lines == [] and printed == 0
    monkeypatch.setenv("DUMP_TOKENS", "1")
    TrainLogger.create(Config.from_args(args)).count_corpora(iter(batches[:3])).__next__()
    first = [ln for ln in capsys.readouterr().out.splitlines() if "DUMP_TOKENS" in ln][0]
    assert first == (" DUMP_TOKENS iteration 1 of this run, micro-batch 1: text[:10] = "
                     f"{batches[0]['text'][:10].tolist()}")
