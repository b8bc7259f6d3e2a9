"""Pipeline parallelism (megatron/model/gpt_pipeline.py, megatron/core/pipeline_schedule.py).

In-process (no DeepSpeed engine): the pipeline layers, run one after the other, are the GPTModel
(same logits and loss, tied and untied, with position ids), and every GPTModel parameter has
exactly one pipeline name. On 2 gloo ranks: the trainer with PP = 2 reproduces the PP = 1 run's
per-step losses and validation loss, its weights after 3 and 6 steps (read back by GPTModel name
from the layer_XX files) equal the PP = 1 checkpoint's, an interrupted PP = 2 run resumes to the
uninterrupted one, a NaN iteration is skipped as at PP = 1, and `PP=2 bash train_alcf.sh` trains.
Refused combinations give one line each.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from distributed import TINY_MODEL, make_dataset, read_metrics, run_trainer
from megatron.arguments import ArgumentError, parse_args
from megatron.model import GPTConfig, GPTModel
from megatron.model.gpt_pipeline import (EmbeddingPipe, FinalNormPipe, FinalPipe, PipelineLoss, TransformerLayerPipe,
                                         _Parts, _tied_logits, layer_gpt_prefixes, read_pipeline_checkpoint)

ITERS = 6
TIED = [a for a in TINY_MODEL if a != "--untie-embeddings-and-output-weights"]  # the harder case: tied head


# ----------------------------------------------------------------------------- in process
def _config(**kw) -> GPTConfig:
    base = dict(vocab_size=128, hidden_size=32, num_layers=3, num_attention_heads=4, num_key_value_heads=2,
                ffn_hidden_size=64, max_position_embeddings=32, init_method_std=0.05)
    return GPTConfig(**{**base, **kw})


def _stages(model: GPTModel) -> list:
    """The pipeline's layer sequence as plain callables (what the engine runs across the stages)."""
    cfg, parts = model.config, _Parts(model)
    seq = [EmbeddingPipe(parts)] + [TransformerLayerPipe(parts, i, cfg) for i in range(cfg.num_layers)]
    if cfg.untie_embeddings_and_output_weights:
        return seq + [FinalPipe(parts, cfg)]
    head = _tied_logits(False)
    return seq + [FinalNormPipe(parts, cfg), lambda x, emb=seq[0]: head(emb, x)]


@pytest.mark.parametrize("kw", [{}, {"untie_embeddings_and_output_weights": False, "output_multiplier": 0.5},
                                {"use_rotary_position_embeddings": False, "normalization": "layernorm",
                                 "swiglu": False}])
@pytest.mark.parametrize("with_positions", [False, True])
def test_layer_sequence_equals_gpt_model(kw, with_positions):
    torch.manual_seed(0)
    model = GPTModel(_config(**kw))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (2, 12), generator=gen)
    labels = torch.randint(0, 128, (2, 12), generator=gen)
    mask = (torch.rand(2, 12, generator=gen) > 0.3).float()
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12) if with_positions else None
    want_logits = model(tokens, position_ids=pos)
    want_loss = (model(tokens, position_ids=pos, labels=labels) * mask).sum() / mask.sum()
    x = tokens if pos is None else (tokens, pos)
    for stage in _stages(model):
        x = stage(x)
    assert (x - want_logits).abs().max().item() <= 1e-6
    assert abs(PipelineLoss()(x, (labels, mask)).item() - want_loss.item()) <= 1e-6


@pytest.mark.parametrize("untied", [True, False])
def test_every_parameter_has_one_pipeline_name(untied):
    model = GPTModel(_config(untie_embeddings_and_output_weights=untied))
    names = []
    for stage, prefixes in zip(_stages(model), layer_gpt_prefixes(3, untied)):
        if isinstance(stage, torch.nn.Module):
            for name, _ in stage.named_parameters():
                local = next(p for p in prefixes if name.startswith(p))
                names.append(prefixes[local] + name[len(local):])
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------- refusals
REFUSED = [
    (["--zero-stage", "2"], "--zero-stage 2 cannot be used with pipeline parallelism (PP > 1): DeepSpeed's pipeline "
                            "engine supports ZeRO 0 and 1 only"),
    (["--zero-stage", "3"], "--zero-stage 3 cannot be used with pipeline parallelism"),
    (["--no-pipeline-parallel"], "--no-pipeline-parallel contradicts --pipeline-model-parallel-size 2"),
    (["--optimizer", "sophiag"], "--optimizer sophiag is not supported with pipeline parallelism"),
    (["--lr-finder"], "--lr-finder is not supported with pipeline parallelism"),
    (["--universal-checkpoint", "--load", "."], "--universal-checkpoint is not supported with pipeline parallelism"),
    (["--num-layers", "1"], "--num-layers (1) must be >= --pipeline-model-parallel-size (2)"),
    (["--checkpoint-activations", "--checkpoint-num-layers", "2"], "--checkpoint-num-layers > 1 is not supported"),
]


def _argv(tmp_path, extra) -> list[str]:
    data = tmp_path / "list.txt"
    data.write_text("1.0 prefix corpus\n")
    return TINY_MODEL + ["--data-file-list", str(data), "--micro-batch-size", "1", "--global-batch-size", "4",
                         "--train-iters", "3", "--lr", "1e-3", "--pipeline-model-parallel-size", "2", *extra]


@pytest.mark.parametrize("extra,message", REFUSED, ids=[" ".join(e) for e, _ in REFUSED])
def test_refused_combinations(tmp_path, extra, message):
    with pytest.raises(ArgumentError) as e:
        parse_args(_argv(tmp_path, extra), env={"WORLD_SIZE": "2"})
    lines = [line for line in str(e.value).splitlines() if message in line]
    assert len(lines) == 1, str(e.value)


def test_pipeline_alone_is_accepted(tmp_path):
    args = parse_args(_argv(tmp_path, ["--zero-stage", "1"]), env={"WORLD_SIZE": "2"})
    assert (args.pipeline_model_parallel_size, args.data_parallel_size, args.num_micro_batches) == (2, 1, 4)


# ----------------------------------------------------------------------------- 2 ranks
def trainer_args(data_list: str, out: str, *extra: str) -> list[str]:
    return TIED + [
        "--data-file-list", data_list, "--split", "90,10,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
        "--lr", "0.003", "--min-lr", "0.0003", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95",
        "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "2", "--num-workers", "0",
        "--zero-stage", "1", "--deepspeed", "--seed", "1234",
        "--save", os.path.join(out, "ckpt"), "--save-interval", "3",
        "--metrics-file", os.path.join(out, "metrics.jsonl"), *extra,
    ]


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("toy-data")))


@pytest.fixture(scope="module")
def runs(data_list, tmp_path_factory):
    """The same 6 iterations (4 micro-batches of 2 per step, tied embeddings, ZeRO-1, fp32) on
    1 rank and with PP = 2 on 2 ranks; checkpoints at 3 and 6."""
    out = {}
    for name, nproc, extra in (("pp1", 1, ()), ("pp2", 2, ("--pipeline-model-parallel-size", "2"))):
        d = str(tmp_path_factory.mktemp(name))
        run_trainer(trainer_args(data_list, d, *extra), nproc=nproc, launcher="ranks")
        out[name] = d
    return out


@pytest.mark.slow
def test_pp2_losses_equal_pp1(runs):
    want, want_val = read_metrics(os.path.join(runs["pp1"], "metrics.jsonl"))
    got, got_val = read_metrics(os.path.join(runs["pp2"], "metrics.jsonl"))
    assert sorted(got) == sorted(want) == list(range(1, ITERS + 1))
    assert max(abs(got[i] - want[i]) for i in want) <= 1e-5, (got, want)
    assert want[ITERS] < want[1]  # it learns
    assert [r["iteration"] for r in got_val] == [r["iteration"] for r in want_val] == [3, 6]
    assert max(abs(g["val_loss"] - w["val_loss"]) for g, w in zip(got_val, want_val)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("step", [3, ITERS])
def test_pp2_weights_equal_pp1(runs, step):
    tag = f"global_step{step}"
    files = sorted(os.listdir(os.path.join(runs["pp2"], "ckpt", tag)))
    assert [f for f in files if f.startswith("layer_")] == [f"layer_{i:02d}-model_00-model_states.pt" for i in range(4)]
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= set(files)
    with open(os.path.join(runs["pp2"], "ckpt", tag, "megatron_args.json")) as f:
        assert json.load(f)["pipeline_model_parallel_size"] == 2
    got = read_pipeline_checkpoint(os.path.join(runs["pp2"], "ckpt", tag), num_layers=2, untied=False)
    want = torch.load(os.path.join(runs["pp1"], "ckpt", tag, "mp_rank_00_model_states.pt"),
                      map_location="cpu", weights_only=False)["module"]
    assert sorted(got) == sorted(want)
    diffs = {k: (got[k].float() - want[k].float()).abs().max().item() for k in want}
    assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.slow
def test_pp2_resume_equals_uninterrupted(runs, data_list, tmp_path):
    """Resume the PP = 2 run from its iteration-3 checkpoint to 6: same losses (<= 1e-6) and weights."""
    ckpt = os.path.join(tmp_path, "ckpt")
    shutil.copytree(os.path.join(runs["pp2"], "ckpt", "global_step3"), os.path.join(ckpt, "global_step3"))
    for name, text in (("latest", "global_step3"), ("latest_checkpointed_iteration.txt", "3")):
        with open(os.path.join(ckpt, name), "w") as f:
            f.write(text)
    run_trainer(trainer_args(data_list, str(tmp_path), "--pipeline-model-parallel-size", "2", "--load", ckpt),
                nproc=2, launcher="ranks")
    want, _ = read_metrics(os.path.join(runs["pp2"], "metrics.jsonl"))
    got, _ = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert sorted(got) == [4, 5, 6]
    assert max(abs(got[i] - want[i]) for i in got) <= 1e-6, (got, want)
    a = read_pipeline_checkpoint(os.path.join(ckpt, f"global_step{ITERS}"), 2, False)
    b = read_pipeline_checkpoint(os.path.join(runs["pp2"], "ckpt", f"global_step{ITERS}"), 2, False)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_pp2_checkpoint_refused_at_pp1(runs, data_list, tmp_path):
    proc = run_trainer(trainer_args(data_list, str(tmp_path), "--load", os.path.join(runs["pp2"], "ckpt"),
                                    "--check-args"), check=False)
    assert proc.returncode == 2
    assert "was saved with pipeline parallel size 2, this run has 1: resume with PP=2" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_pp2_skips_nan_iteration(data_list, tmp_path):
    """MEGATRON_TEST_FAULTS=nan@2: iteration 2 is skipped on both stages (no update, no LR step)."""
    run_trainer(trainer_args(data_list, str(tmp_path), "--pipeline-model-parallel-size", "2", "--train-iters", "3",
                             "--eval-iters", "0"),
                nproc=2, launcher="ranks", env_extra={"MEGATRON_TEST_FAULTS": "nan@2"})
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        recs = {r["iteration"]: r for r in map(json.loads, f) if "lm_loss" in r}
    assert recs[2]["lm_loss"] != recs[2]["lm_loss"]  # NaN
    assert [recs[i]["skipped_iterations"] for i in (1, 2, 3)] == [0, 1, 0]
    assert recs[2]["lr"] == recs[1]["lr"] and recs[3]["lr"] != recs[2]["lr"]  # the schedule did not advance
    w = read_pipeline_checkpoint(os.path.join(tmp_path, "ckpt", "global_step3"), 2, False)
    assert all(torch.isfinite(t).all() for t in w.values())
    assert recs[3]["lm_loss"] < recs[1]["lm_loss"] + 0.5


@pytest.mark.slow
def test_launcher_pp2(demo_data, tmp_path):
    """PP=2 NPROC=2 bash train_alcf.sh: the launcher passes --pipeline-model-parallel-size=2, the run
    trains and writes pipeline checkpoints, and the loss is the same at every logged step on both stages."""
    from test_end_to_end import metrics_of, run_launcher

    demo = demo_data
    work = tmp_path / "work"
    work.mkdir()
    proc = run_launcher(work, {"DATA_FILE_LIST": demo, "TRAIN_ITERS": "4", "MODEL_ARCH": "tiny", "NPROC": "2",
                               "PP": "2", "MICRO_BATCH": "2", "GRAD_ACC_STEPS": "2"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "Traceback" not in out
    train, _ = metrics_of(work)
    assert sorted(train) == [1, 2, 3, 4]
    assert all(r["consumed_samples"] == 4 * i for i, r in train.items())  # GBS = DP 1 x MB 2 x GAS 2
    assert all(0 < r["lm_loss"] < 20 for r in train.values())
    (ckpt,) = [d for d in (work / "checkpoints").iterdir() if "-pp2-" in d.name]
    assert sorted(p.name for p in (ckpt / "global_step4").glob("layer_*")) == \
        [f"layer_{i:02d}-model_00-model_states.pt" for i in range(4)]
