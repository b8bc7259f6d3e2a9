"""Performance regression guard: a reduced `bench/train_throughput.py` (tiny model, a few
interleaved iterations) must keep our trainer at >= 0.9x the tokens/s of a plain PyTorch loop
around transformers' LlamaForCausalLM, in fp32 and bf16. Also checks that the two sides train
the same model on the same batch (their first losses agree), and the --compile refusals.

Noise: the machine is shared, so the two sides are timed alternately, iteration by iteration;
the verdict uses the better of two noise-robust estimates (median of per-round ratios, ratio of
the fastest iterations), and a failing measurement is repeated once before the test fails.
The comparison runs in a subprocess (it makes this process rank 0 of a DeepSpeed world).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest

from megatron.arguments import compile_problems
from megatron.config import Config, default_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_RATIO = 0.9


def _measure(tmp_path, attempt: int) -> list[dict]:
    out = tmp_path / f"throughput-{attempt}.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", "2")
    # the launcher's default, ZeRO-1 (which one replica runs as stage 0)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_throughput.py"), "--small",
                           "--rounds", "10", "--warmup", "3", "--json", str(out), "--zero-stage", "1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_train_throughput_not_slower_than_hf_loop(tmp_path):
    results = _measure(tmp_path, 0)
    if any(max(r["ratio"], r["best_ratio"]) < MIN_RATIO for r in results):
        results = _measure(tmp_path, 1)  # a loaded machine: a real regression fails twice
    assert [r["dtype"] for r in results] == ["fp32", "bf16"]
    assert [r["zero_stage_run"] for r in results] == [0, 0]  # one replica: ZeRO-1 runs as stage 0
    for r in results:
        # same initial weights, same first batch: the first losses agree (bf16: pure bf16 vs autocast)
        ours, hf = r["first_loss"]
        assert ours == pytest.approx(hf, rel=1e-4 if r["dtype"] == "fp32" else 2e-2), r
        assert 0 < r["ours_mfu"] <= 1.5 and 0 < r["hf_mfu"] <= 1.5, r  # same FLOPs formula, measured peak
        assert r["data_wait_frac"] < 0.05, r  # the loader never stalls the step
        assert max(r["ratio"], r["best_ratio"]) >= MIN_RATIO, (
            f"{r['dtype']}: our tokens/s fell to {r['ratio']:.3f}x (best {r['best_ratio']:.3f}x) of the HF loop; "
            f"iteration seconds {r['samples']}")


def _args(**kw) -> argparse.Namespace:
    base = dict(compile=True, zero_stage=1, recompute_granularity=None, checkpoint_activations=False)
    base.update(kw)
    return default_args(**base)


def test_compile_refusals(monkeypatch):
    assert compile_problems(_args(compile=False, zero_stage=3)) == []
    monkeypatch.setenv("CXX", "g++")
    import shutil

    if shutil.which("g++"):
        assert compile_problems(_args()) == []
    z3 = compile_problems(_args(zero_stage=3))
    assert any("ZeRO-3" in e and "--zero-stage 1 or 2" in e for e in z3)
    rec = compile_problems(_args(recompute_granularity="full"))
    assert any("recompute" in e for e in rec)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    import torch

    if not torch.cuda.is_available():
        assert any("C++ compiler" in e for e in compile_problems(_args()))


def test_zero_overlap_and_bucket_flags_reach_the_deepspeed_config(tmp_path):
    """--overlap-grad-reduce / --ddp-bucket-size map to DeepSpeed's ZeRO keys; without them the
    DeepSpeed config file's values are kept."""
    from megatron.arguments import ArgumentError, parse_args
    from megatron.training import build_ds_config

    data = tmp_path / "list.txt"
    data.write_text("1.0 prefix corpus\n")
    cfg_file = tmp_path / "ds.json"
    cfg_file.write_text(json.dumps({"zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 7}}))
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--lr", "1e-3", "--train-iters", "2", "--data-file-list", str(data), "--deepspeed_config", str(cfg_file)]
    env = {"WORLD_SIZE": "1"}
    kept = build_ds_config(Config.from_args(parse_args(base, env=env)))["zero_optimization"]
    # the file's reduce bucket wins; the all-gather bucket it leaves out is sized by the model (the floor here)
    assert kept["overlap_comm"] is False and kept["reduce_bucket_size"] == 7
    assert kept["allgather_bucket_size"] == 5_000_000
    zero = build_ds_config(Config.from_args(parse_args(base + ["--overlap-grad-reduce", "--ddp-bucket-size", "5e7"],
                                                       env=env)))["zero_optimization"]
    assert zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 50_000_000
    with pytest.raises(ArgumentError, match="--ddp-bucket-size must be > 0"):
        parse_args(base + ["--ddp-bucket-size", "0"], env=env)
    with pytest.raises(ArgumentError, match="--compile is not supported with ZeRO-3"):
        parse_args(base + ["--compile", "--zero-stage", "3"], env=env)


@pytest.mark.parametrize("layers,hidden,vocab,bucket", [
    (2, 64, 512, 5_000_000),  # tiny: the 5e6 floor (one bucket, as DeepSpeed's default would be)
    # 12 x (4 x 768^2 + 3 x 768 x 2048 + 2 x 768) + 2 x 32000 x 768 + 768 = 134,105,856 -> / 8
    (12, 768, 32000, 16_763_232),
    (96, 8192, 32000, 500_000_000),  # GPT-3 size: DeepSpeed's 5e8 cap
])
def test_zero_bucket_sizes_by_model_size(layers, hidden, vocab, bucket, tmp_path):
    """Without a flag or a config value, ZeRO's reduce/all-gather buckets are an eighth of the
    parameters within [5e6, 5e8] elements (bench/memory.py: DeepSpeed's 5e8 made a 134M model's
    bucket a whole extra gradient copy)."""
    from megatron.arguments import parse_args
    from megatron.deepspeed_config import zero3_fetch_by_layer
    from megatron.training import build_ds_config

    data = tmp_path / "list.txt"
    data.write_text("1.0 prefix corpus\n")
    argv = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", "4",
            "--ffn-hidden-size", str(2048 if hidden == 768 else 4 * hidden), "--swiglu",
            "--normalization", "rmsnorm", "--disable-bias-linear", "--use-rotary-position-embeddings",
            "--untie-embeddings-and-output-weights", "--seq-length", "32", "--lr", "1e-3", "--train-iters", "2",
            "--data-file-list", str(data), "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(vocab), "--zero-stage", "2"]
    args = parse_args(argv, env={"WORLD_SIZE": "1"})
    args.padded_vocab_size = vocab
    zero = build_ds_config(Config.from_args(args))["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == bucket
    assert "sub_group_size" not in zero and "stage3_max_live_parameters" not in zero  # ZeRO-3's only
    assert not zero3_fetch_by_layer(Config.from_args(args), zero)  # ZeRO-3's only
    args.zero_stage = 3  # ZeRO-3's sub-group and live / reuse limits: the same eighth (DeepSpeed's defaults 1e9)
    zero = build_ds_config(Config.from_args(args))["zero_optimization"]
    assert zero["sub_group_size"] == zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == bucket
    assert zero["stage3_prefetch_bucket_size"] == min(bucket, 50_000_000)
    # whole layers fetched only where the limits hold the whole model (the floor's tiny model); DeepSpeed's 1e9
    # limits would hold the 134M one too, not GPT-3
    assert zero3_fetch_by_layer(Config.from_args(args), zero) == (bucket == 5_000_000)
    assert zero3_fetch_by_layer(Config.from_args(args), {}) == (bucket < 500_000_000)


def test_zero3_memory_settings_leave_the_scaling_model_as_it_was():
    """bench/scaling.py's ZeRO-3 model (4.3M parameters) is below the 5e6 floor: one sub-group, every parameter
    stays gathered from its forward to its backward (no extra all-gather), as with DeepSpeed's defaults."""
    from bench.scaling import MODEL
    from megatron.arguments import parse_args
    from megatron.deepspeed_config import zero3_fetch_by_layer
    from megatron.resilience.preflight import parameters_per_rank
    from megatron.training import build_ds_config

    args = parse_args(MODEL + ["--zero-stage", "3", "--lr", "1e-3", "--train-iters", "2", "--data-path", "x"],
                      env={"WORLD_SIZE": "2"})
    args.padded_vocab_size = 2048
    config = Config.from_args(args)
    params = parameters_per_rank(config.model, config.parallel, 2048)
    zero = build_ds_config(config)["zero_optimization"]
    assert 4e6 < params < zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 5e6
    assert zero["sub_group_size"] > params and zero["stage3_prefetch_bucket_size"] > params
    assert zero3_fetch_by_layer(config, zero)  # so its transformer layers are fetched whole


def _fake_scaling(monkeypatch, rates: dict) -> list:
    """bench.scaling with its trainer runs replaced: run_config returns rates[(nproc, zero)][round]; the runs made."""
    sys.path.insert(0, ROOT)
    import bench.scaling as scaling

    runs = []

    def run_config(nproc, zero, data_list, workdir, iters, gbs, tag, dtype, zero_config=None):
        runs.append((nproc, zero, zero_config))
        return rates[nproc, zero][int(tag.rsplit("_", 1)[1])]

    monkeypatch.setattr(scaling, "run_config", run_config)
    monkeypatch.setattr(scaling, "write_corpus", lambda *a: "list.txt")
    return runs


def test_scaling_baseline_zero1_divides_by_the_same_rounds_zero1_run(monkeypatch, capsys):
    """`bench/scaling.py --baseline zero1`: no 1-rank run; the rounds alternate the 2-rank ZeRO-1 run (added
    though --stages leaves it out) with the others, and each stage's ratio is the median over rounds of its
    tokens/s over that round's ZeRO-1 tokens/s (hand-worked: 900/1000 = 0.9, 760/800 = 0.95 -> 0.925)."""
    import bench.scaling as scaling

    runs = _fake_scaling(monkeypatch, {(2, 1): [1000, 800], (2, 3): [900, 760]})
    out = scaling.main(["--baseline", "zero1", "--stages", "3", "--rounds", "2", "--zero-config", '{"a": 1}'])
    assert runs == [(2, 1, {"a": 1}), (2, 3, {"a": 1}), (2, 3, {"a": 1}), (2, 1, {"a": 1})]  # alternating
    assert out["vs_zero1"] == {3: pytest.approx(0.925)}
    assert capsys.readouterr().out.splitlines()[-1] == "vs_zero1 zero3=0.925"
    # the default baseline: the 1-rank x 2-thread run, and the efficiency line bench/targets.py reads
    runs = _fake_scaling(monkeypatch, {(1, 1): [1000, 800], (2, 1): [990, 800], (2, 3): [900, 760]})
    out = scaling.main(["--stages", "1,3", "--rounds", "2"])
    assert [r[:2] for r in runs] == [(1, 1), (2, 1), (2, 3), (2, 3), (2, 1), (1, 1)]
    assert out["efficiency"] == {1: pytest.approx(0.995), 3: pytest.approx(0.925)}
    assert capsys.readouterr().out.splitlines()[-1] == "efficiency zero1=0.995 zero3=0.925"


def test_memory_formula_by_hand():
    """bench/memory.py's ZeRO-paper formula: 2 + 2 + 12 bytes per parameter, partitioned terms / DP."""
    sys.path.insert(0, ROOT)
    from bench.memory import formula

    p = 1000
    assert formula(p, 0, 2) == 16 * p
    assert formula(p, 1, 2) == (2 + 2 + 6) * p
    assert formula(p, 2, 2) == (2 + 1 + 6) * p
    assert formula(p, 3, 2) == 8 * p
    assert formula(p, 3, 4) == 4 * p
    # the fp32-gradient runs against the same formula with 4-byte gradients: 2 + 4 + 12
    assert formula(p, 0, 2, grad_bytes=4) == 18 * p
    assert formula(p, 1, 2, grad_bytes=4) == (2 + 4 + 6) * p
    assert formula(p, 2, 2, grad_bytes=4) == (2 + 2 + 6) * p
    assert formula(p, 3, 2, grad_bytes=4) == 9 * p


@pytest.mark.slow
def test_memory_bench_smoke(tmp_path):
    """bench/memory.py end to end on the tiny model, ZeRO-3 on 2 ranks, one iteration, bf16 and fp32
    gradients: each rank reports a baseline and a larger peak; the formula uses the model's parameter count
    worked out by hand (2 x (4 x 64^2 + 3 x 64 x 176 + 2 x 64) + 2 x 512 x 64 + 64 = 166,208) and the
    run's gradient bytes; the final line has both dtypes' worst cell."""
    out = tmp_path / "memory.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "memory.py"), "--model", "tiny",
                           "--configs", "z3", "--iters", "1", "--json", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["grads"]) for r in rows] == [("z3", "bf16"), ("z3", "fp32")]
    for row, per_param in zip(rows, (8, 9)):  # (2 + 2 + 12) / 2 and (2 + 4 + 12) / 2 bytes per parameter
        assert row["ranks"] == 2 and row["stage"] == 3
        assert row["parameters"] == 166_208
        assert row["formula_states"] == per_param * 166_208
        assert len(row["per_rank"]) == 2 and all(0 < x < 2**31 for x in row["per_rank"])
        assert row["ours"] == max(row["per_rank"]) and row["activations"] > 0
        assert [n for n, _, _ in row["phases"]][:4] == ["engine", "forward", "backward", "step"]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio max=[\d.]+ zero3/zero0=nan fp32grad_max=[\d.]+ fp32grad_zero3/zero0=nan", last), last
