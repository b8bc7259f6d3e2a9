"""tools/convert_checkpoint: universal checkpoints (DP=2 -> DP=1, ZeRO-1 -> ZeRO-2, AdamW and
DeepSpeed's ZeRO Muon, TP=2 <-> TP=1, non-Adam state, the large-DP padding fix), the two CPT
recipes of the user guide (2 ranks -> 1 rank, LR curve asserted from metrics.jsonl), the
launcher's convert_ckpt_to_universal, and HF export/import."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from distributed import ROOT, TINY_MODEL, become_rank, env_for, free_port, make_dataset, run_trainer, spawn

from megatron.checkpoint import checkpointing as ck
from tools.convert_checkpoint import ds_to_universal as d2u

pytestmark = pytest.mark.slow
N = 3
LR, MIN_LR = 0.003, 0.0003


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("toy-data")))


def targs(data_list: str, out: str, *, iters: int = 2 * N, zero: int = 1, extra: tuple = ()) -> list[str]:
    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(iters),
        "--lr", str(LR), "--min-lr", str(MIN_LR), "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--adam-beta2", "0.95", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
        "--num-workers", "0", "--zero-stage", str(zero), "--deepspeed", "--seed", "1234",
        "--metrics-file", os.path.join(out, "metrics.jsonl"), *extra,
    ]


def metrics(out: str) -> dict[int, dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if "lm_loss" in r}


def copy_ckpt(src: str, dst: str, tag: str) -> str:
    os.makedirs(dst, exist_ok=True)
    shutil.copytree(os.path.join(src, tag), os.path.join(dst, tag))
    ck.write_atomic(os.path.join(dst, "latest"), tag)
    ck.write_atomic(os.path.join(dst, ck.TRACKER_FILE), tag[len("global_step"):])
    return dst


@pytest.fixture(scope="module")
def phase1(data_list, tmp_path_factory):
    """Phase 1 as the guide's new runs: constant LR (warmup 2 iterations), 2 ranks, ZeRO-1, AdamW,
    checkpoints at N and 2N."""
    out = str(tmp_path_factory.mktemp("phase1"))
    save = os.path.join(out, "ckpt")
    run_trainer(targs(data_list, out, extra=("--lr-decay-style", "constant", "--lr-warmup-iters", "2",
                                             "--save", save, "--save-interval", str(N))),
                nproc=2, launcher="ranks")
    return save, metrics(out)


# ----------------------------------------------------------------------------- universal at another DP / stage
@pytest.mark.parametrize("zero", [1, 2])
def test_universal_dp2_to_dp1(phase1, data_list, tmp_path, zero):
    """ZeRO-1 DP=2 checkpoint of iteration N -> universal -> 1 rank at ZeRO `zero`: the following
    steps equal the unconverted 2-rank continuation (weights, Adam moments, step, LR, data)."""
    save, want = phase1
    ckpt = copy_ckpt(save, str(tmp_path / "ckpt"), f"global_step{N}")
    tag = d2u.convert(os.path.join(ckpt, f"global_step{N}"), os.path.join(ckpt, f"global_step{N}_universal"))
    assert ck.read_tag(ckpt, universal=True) == tag == f"global_step{N}_universal"
    atoms = os.path.join(ckpt, tag, "zero", "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight")
    assert sorted(os.listdir(atoms)) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
    # vocabulary padding kept (512 rows): the padded rows' trained values survive
    emb = torch.load(os.path.join(ckpt, tag, "zero", "language_model.embedding.word_embeddings.weight", "fp32.pt"),
                     weights_only=False)["param"]
    assert emb.shape == (512, 64)
    out = str(tmp_path / "run")
    run_trainer(targs(data_list, out, zero=zero, extra=("--lr-decay-style", "constant", "--lr-warmup-iters", "2",
                                                        "--load", ckpt, "--universal-checkpoint")))
    got = metrics(out)
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    for i in range(N + 1, 2 * N + 1):
        assert abs(got[i]["lm_loss"] - want[i]["lm_loss"]) <= 1e-6, (i, got[i], want[i])
        assert got[i]["lr"] == pytest.approx(want[i]["lr"], rel=1e-12)
        assert got[i]["consumed_samples"] == want[i]["consumed_samples"]


def test_universal_from_zero3(data_list, tmp_path):
    """A ZeRO-3 DP=2 checkpoint of iteration N -> universal -> 1 rank at ZeRO-1: the following steps equal
    the unconverted ZeRO-3 2-rank continuation (parameters and Adam moments gathered from the stage 3
    partitions)."""
    out3, save = str(tmp_path / "zero3"), str(tmp_path / "zero3" / "ckpt")
    run_trainer(targs(data_list, out3, zero=3, extra=("--lr-decay-style", "constant", "--lr-warmup-iters", "2",
                                                      "--save", save, "--save-interval", str(N))),
                nproc=2, launcher="ranks")
    want = metrics(out3)
    ckpt = copy_ckpt(save, str(tmp_path / "ckpt"), f"global_step{N}")
    tag = d2u.convert(os.path.join(ckpt, f"global_step{N}"), os.path.join(ckpt, f"global_step{N}_universal"))
    atoms = os.path.join(ckpt, tag, "zero", "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight")
    assert {"exp_avg.pt", "exp_avg_sq.pt", "fp32.pt"} <= set(os.listdir(atoms))
    out = str(tmp_path / "run")
    run_trainer(targs(data_list, out, zero=1, extra=("--lr-decay-style", "constant", "--lr-warmup-iters", "2",
                                                     "--load", ckpt, "--universal-checkpoint")))
    got = metrics(out)
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    for i in range(N + 1, 2 * N + 1):
        assert abs(got[i]["lm_loss"] - want[i]["lm_loss"]) <= 1e-5, (i, got[i], want[i])
        assert got[i]["consumed_samples"] == want[i]["consumed_samples"]


def test_zero3_sub_groups_resume_and_convert(data_list, tmp_path):
    """A ZeRO-3 DP=2 checkpoint whose optimizer state is split into sub-groups (sub_group_size 20000 from a
    DeepSpeed config: 15 sub-groups of the tiny model; larger models get several by size) resumes without
    that config (the checkpoint records its size and the resume takes it: DeepSpeed refuses other sub-groups)
    and converts to a universal checkpoint: both continuations equal the uninterrupted run."""
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"zero_optimization": {"sub_group_size": 20000}}')
    out3, save = str(tmp_path / "zero3"), str(tmp_path / "zero3" / "ckpt")
    common = ("--lr-decay-style", "constant", "--lr-warmup-iters", "2")
    run_trainer(targs(data_list, out3, zero=3, extra=(*common, "--save", save, "--save-interval", str(N),
                                                      "--deepspeed_config", str(cfg))), nproc=2, launcher="ranks")
    want = metrics(out3)
    with open(os.path.join(save, f"global_step{N}", "megatron_args.json")) as f:
        assert json.load(f)["zero3_sub_group_size"] == 20000
    resumed = str(tmp_path / "resumed")
    ckpt = copy_ckpt(save, os.path.join(resumed, "ckpt"), f"global_step{N}")
    run_trainer(targs(data_list, resumed, zero=3, extra=(*common, "--load", ckpt)), nproc=2, launcher="ranks")
    universal = str(tmp_path / "universal")
    ckpt = copy_ckpt(save, os.path.join(universal, "ckpt"), f"global_step{N}")
    d2u.convert(os.path.join(ckpt, f"global_step{N}"), os.path.join(ckpt, f"global_step{N}_universal"))
    run_trainer(targs(data_list, universal, zero=1, extra=(*common, "--load", ckpt, "--universal-checkpoint")))
    for out, tol in ((resumed, 0.0), (universal, 1e-5)):
        got = metrics(out)
        assert sorted(got) == list(range(N + 1, 2 * N + 1))
        for i in got:
            assert abs(got[i]["lm_loss"] - want[i]["lm_loss"]) <= tol, (out, i, got[i], want[i])


@pytest.mark.parametrize("dtype,nproc,zero", [("fp32", 2, 1), ("bf16", 1, 2)])
def test_universal_from_zero_stage0(data_list, tmp_path, dtype, nproc, zero):
    """A ZeRO stage 0 checkpoint (its optimizer state inside the model-states file: a torch
    state dict in fp32, DeepSpeed's fp32 master weights + state dict under bf16) -> universal ->
    ZeRO-1 at 2 ranks / ZeRO-2 at 1 rank: the following steps equal the stage 0 continuation."""
    # bf16 at stage 0: one micro-batch per step (DeepSpeed's stage 0 bf16 optimizer would sum two in bf16)
    bf16 = ("--bf16", "--micro-batch-size", "8") if dtype == "bf16" else ()
    ref = str(tmp_path / "ref")
    save = os.path.join(ref, "ckpt")
    run_trainer(targs(data_list, ref, zero=0, extra=(*bf16, "--lr-decay-style", "constant", "--lr-warmup-iters",
                                                     "2", "--save", save, "--save-interval", str(N))))
    want = metrics(ref)
    step_dir = os.path.join(save, f"global_step{N}")
    assert not glob.glob(os.path.join(step_dir, "*optim_states.pt"))  # stage 0: no ZeRO shards
    ckpt = copy_ckpt(save, str(tmp_path / "ckpt"), f"global_step{N}")
    tag = d2u.convert(os.path.join(ckpt, f"global_step{N}"), os.path.join(ckpt, f"global_step{N}_universal"))
    atoms = os.path.join(ckpt, tag, "zero", "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight")
    assert sorted(os.listdir(atoms)) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
    master = torch.load(os.path.join(atoms, "fp32.pt"), weights_only=False)["param"]
    assert master.dtype == torch.float32 and master.shape == (256, 64)
    if dtype == "bf16":  # the fp32 master, not the bf16 weight rounded up
        module = torch.load(os.path.join(step_dir, "mp_rank_00_model_states.pt"), weights_only=False)["module"]
        weight = module["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"]
        assert weight.dtype == torch.bfloat16 and not torch.equal(master, weight.float())
        assert torch.equal(master.bfloat16(), weight)
        from tools.convert_checkpoint.to_hf import load_fp32_weights  # HF export reads the master too
        exported = load_fp32_weights(save, f"global_step{N}")
        assert torch.equal(exported["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"], master)
    out = str(tmp_path / "run")
    run_trainer(targs(data_list, out, zero=zero, extra=(*bf16, "--lr-decay-style", "constant", "--lr-warmup-iters",
                                                        "2", "--load", ckpt, "--universal-checkpoint")),
                nproc=nproc, launcher="ranks")
    got = metrics(out)
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    tol = 1e-6 if dtype == "fp32" else 2e-3  # bf16: ZeRO accumulates the bf16 gradients in another order
    for i in range(N + 1, 2 * N + 1):
        assert abs(got[i]["lm_loss"] - want[i]["lm_loss"]) <= tol, (i, got[i], want[i])
        assert got[i]["lr"] == pytest.approx(want[i]["lr"], rel=1e-12)


def test_stage0_without_names_is_refused(data_list, tmp_path):
    """A stage 0 checkpoint whose optimizer groups carry no parameter names (an older writer) is
    refused with the way out, and nothing is written."""
    ref = str(tmp_path / "ref")
    save = os.path.join(ref, "ckpt")
    run_trainer(targs(data_list, ref, iters=N, zero=0, extra=("--save", save, "--save-interval", str(N))))
    path = os.path.join(save, f"global_step{N}", "mp_rank_00_model_states.pt")
    sd = torch.load(path, weights_only=False)
    del sd["optimizer_param_names"]
    torch.save(sd, path)
    out = os.path.join(save, "u")
    with pytest.raises(d2u.ConversionError, match="without the parameter names.*--finetune"):
        d2u.convert(os.path.join(save, f"global_step{N}"), out)
    assert not os.path.exists(out) and not os.path.exists(os.path.join(save, "latest_universal"))


MUON = ("--optimizer", "muon", "--lr-decay-style", "constant", "--lr-warmup-iters", "2")
NO_COMPILE = {"TORCHDYNAMO_DISABLE": "1"}  # DeepSpeed torch.compile's its Muon kernels (~20 s); eager: same math


@pytest.fixture(scope="module")
def muon_phase1(data_list, tmp_path_factory):
    """2 ranks, ZeRO-1, DeepSpeed's ZeRO Muon (momentum on flat partitions + its auxiliary AdamW),
    checkpoint at N."""
    out = str(tmp_path_factory.mktemp("muon1"))
    save = os.path.join(out, "ckpt")
    run_trainer(targs(data_list, out, extra=(*MUON, "--save", save, "--save-interval", str(N))),
                nproc=2, launcher="ranks", env_extra=NO_COMPILE)
    return save, metrics(out)


@pytest.mark.parametrize("nproc,zero", [(1, 1), (1, 2), (2, 2)])
def test_universal_muon_dp2_to_dp1(muon_phase1, data_list, tmp_path, nproc, zero):
    """The ZeRO Muon checkpoint of iteration N (DP=2, ZeRO-1) -> universal -> `nproc` ranks at ZeRO
    `zero`: DeepSpeed keeps this Muon's momentum per whole parameter (not per partition element);
    the converter and the loader translate it, and the following steps equal the unconverted
    2-rank continuation (at DP=2 a hidden matrix straddles the two partitions)."""
    save, want = muon_phase1
    ckpt = copy_ckpt(save, str(tmp_path / "ckpt"), f"global_step{N}")
    tag = d2u.convert(os.path.join(ckpt, f"global_step{N}"), os.path.join(ckpt, f"global_step{N}_universal"))
    zero_dir = os.path.join(ckpt, tag, "zero")
    qkv = os.path.join(zero_dir, "language_model.encoder.layers.0.self_attention.query_key_value.weight")
    assert sorted(os.listdir(qkv)) == ["fp32.pt", "momentum_buffer.pt"]
    head = os.path.join(zero_dir, "language_model.output_layer.weight")
    assert sorted(os.listdir(head)) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
    out = str(tmp_path / "run")
    run_trainer(targs(data_list, out, zero=zero, extra=(*MUON, "--load", ckpt, "--universal-checkpoint")),
                nproc=nproc, launcher="ranks", env_extra=NO_COMPILE)
    got = metrics(out)
    assert sorted(got) == list(range(N + 1, 2 * N + 1))
    for i in range(N + 1, 2 * N + 1):
        assert abs(got[i]["lm_loss"] - want[i]["lm_loss"]) <= 1e-6, (i, got[i], want[i])
        assert got[i]["lr"] == pytest.approx(want[i]["lr"], rel=1e-12)


# ----------------------------------------------------------------------------- universal at another TP size
def _logits_worker(rank: int, nproc: int, port: int, argv: list, out: str) -> None:
    """Build the trainer's engine at the TP size of `argv`, load its --load checkpoint through
    checkpointing.load_checkpoint, and save the logits of a fixed batch (rank 0)."""
    become_rank(rank, nproc, port)
    from megatron.arguments import parse_args
    from megatron.config import Config
    from megatron.initialize import initialize_megatron
    from megatron.training import build_tokenizer_and_vocab, setup_model_and_optimizer

    args = parse_args(argv)
    initialize_megatron(args)
    build_tokenizer_and_vocab(args)
    _model, engine = setup_model_and_optimizer(args)
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(5))
    engine.module.eval()
    with torch.no_grad():
        fresh = engine.module(tokens)  # the seed's initialization (the same at every TP size)
    state = ck.load_checkpoint(engine, Config.from_args(args))
    with torch.no_grad():
        logits = engine.module(tokens)  # gathered over the TP ranks
    if rank == 0:
        torch.save({"logits": logits, "fresh": fresh, "iteration": state.iteration}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def logits_after_load(tp: int, load: str, out: str, *extra: str) -> dict:
    argv = TINY_MODEL + ["--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "1",
                         "--data-path", "unused", "--zero-stage", "1", "--deepspeed", "--seed", "1", "--lr", "1e-3",
                         "--use-checkpoint-opt_param-scheduler", "--tensor-model-parallel-size", str(tp),
                         "--load", load, *extra]
    spawn(_logits_worker, (tp, free_port(), argv, out), tp)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("src,dst", [(2, 1), (1, 2)])
def test_universal_across_tp(phase1, data_list, tmp_path, src, dst):
    """A TP=`src` checkpoint (TP=2: 2 iterations on 2 ranks, ZeRO-1; TP=1: phase 1's iteration N, DP=2)
    -> universal -> loaded at TP=`dst` (1 process per TP rank): the logits of a fixed batch equal
    those of the TP=`src` model loaded from the unconverted checkpoint (<= 1e-5). Covers QKV and
    gate|up (column-parallel: whole KV groups / both halves per rank), dense and 4h->h
    (row-parallel), the vocabulary-parallel embedding and head, and the replicated norms."""
    if src == 2:
        save, it, plain = str(tmp_path / "ckpt"), 2, ()
        run_trainer(targs(data_list, str(tmp_path / "train"), iters=it, extra=(
            "--tensor-model-parallel-size", "2", "--lr-decay-style", "constant", "--save", save)),
            nproc=2, launcher="ranks")
    else:  # its ZeRO shards are for DP=2: the reference reads the weights only
        save, it, plain = copy_ckpt(phase1[0], str(tmp_path / "ckpt"), f"global_step{N}"), N, ("--no-load-optim",)
    want = logits_after_load(src, save, str(tmp_path / "want.pt"), *plain)
    assert want["iteration"] == it and want["logits"].shape == (2, 32, 512)
    if src == 2:  # to_hf.py merges the TP shards: HF LlamaForCausalLM gives the TP=2 model's logits
        from transformers import AutoModelForCausalLM

        hf_dir = str(tmp_path / "hf")
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools/convert_checkpoint/to_hf.py"), "--load",
                               save, "--output", hf_dir], env={**env_for(1), "HF_HUB_OFFLINE": "1"},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not os.path.exists(os.path.join(save, "latest_universal"))  # the merge used a temporary folder
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
        tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(5))  # _logits_worker's
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, want["logits"], rtol=0, atol=1e-5)
    d2u.convert(os.path.join(save, f"global_step{it}"), os.path.join(save, f"global_step{it}_universal"))
    got = logits_after_load(dst, save, str(tmp_path / "got.pt"), "--universal-checkpoint")
    assert got["iteration"] == it
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-5)
    # the trained weights were loaded: the logits moved away from the seed's initialization
    assert (got["fresh"] - got["logits"]).abs().max() > 1e-2


def test_padding_fix_large_padding_group(tmp_path):
    """A parameter group smaller than its ZeRO padding (the DP=768 bug, reproduced at DP=2 with a
    1-element group, bf16 ZeRO-1 as AuroraGPT, in the older DeepSpeed's padding record): the
    stock converter fails with narrow(); ours converts exactly (the fp32 masters)."""
    script = tmp_path / "tiny_ds.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, deepspeed
        from megatron.deepspeed_compat import skip_shm_inference_op
        skip_shm_inference_op()  # as the trainer: no C++ all-reduce op compiled in a fresh environment
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        groups = [{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=0.1)
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
               "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        g = torch.Generator().manual_seed(engine.global_rank)
        for _ in range(2):
            x = torch.randn(2, 4, generator=g).to(torch.bfloat16)
            loss = engine(x).float().pow(2).mean(); engine.backward(loss); engine.step()
        engine.save_checkpoint(sys.argv[1], tag="global_step2",
                               client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}})
        masters = {n: deepspeed.utils.safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}
        if engine.global_rank == 0:
            torch.save(masters, sys.argv[1] + "/weights.pt")
        # tear gloo down before the interpreter does (left to exit, its threads intermittently abort: SIGABRT)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    """))
    ckpt = str(tmp_path / "ck")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), ckpt]
    proc = subprocess.run(cmd, env=env_for(2), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # DeepSpeed 0.19.8 records the padding per rank; the DeepSpeed that wrote the AuroraGPT
    # checkpoints recorded the whole group's padding on the last rank (3 here, for a 2-element
    # partition). Rewrite the shards that way, as such a checkpoint looks on disk.
    shards = sorted(glob.glob(f"{ckpt}/global_step2/*optim_states.pt"))
    assert len(shards) == 2
    for rank, path in enumerate(shards):
        sd = torch.load(path, weights_only=False)
        osd = sd["optimizer_state_dict"]
        assert osd["single_partition_of_fp32_groups"][1].numel() == 1 - rank  # the bias group: 1 element
        osd["group_paddings"] = [0, 0] if rank == 0 else [0, 3]
        torch.save(sd, path)
    stock = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            f"{ckpt}/global_step2", "--output_folder", f"{ckpt}/stock_universal",
                            "--num_extract_workers", "1", "--num_merge_workers", "1"],
                           env=env_for(1), capture_output=True, text=True, timeout=600)
    assert stock.returncode != 0 and "narrow(): length must be non-negative" in stock.stderr
    d2u.convert(f"{ckpt}/global_step2", f"{ckpt}/global_step2_universal")
    weights = torch.load(f"{ckpt}/weights.pt")
    for name in ("weight", "bias"):
        atom = torch.load(f"{ckpt}/global_step2_universal/zero/{name}/fp32.pt", weights_only=False)["param"]
        torch.testing.assert_close(atom, weights[name], rtol=0, atol=0)
        moment = torch.load(f"{ckpt}/global_step2_universal/zero/{name}/exp_avg.pt", weights_only=False)["param"]
        assert moment.shape == weights[name].shape and moment.abs().sum() > 0


def test_non_adam_state_sgd_momentum(data_list, tmp_path):
    """SGD momentum (ZeRO-2, DP=2): DeepSpeed's converter only knows exp_avg/exp_avg_sq (KeyError);
    ours converts momentum_buffer, and 1 rank at ZeRO-1 continues exactly."""
    ref, save = str(tmp_path / "ref"), str(tmp_path / "ref" / "ckpt")
    sgd = ("--optimizer", "sgd", "--sgd-momentum", "0.9", "--lr-decay-style", "constant")
    run_trainer(targs(data_list, ref, zero=2, extra=(*sgd, "--save", save, "--save-interval", str(N))),
                nproc=2, launcher="ranks")
    want = metrics(ref)
    ckpt = copy_ckpt(save, str(tmp_path / "ckpt"), f"global_step{N}")
    stock = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            f"{ckpt}/global_step{N}", "--output_folder", f"{ckpt}/stock",
                            "--num_extract_workers", "1", "--num_merge_workers", "1"],
                           env=env_for(1), capture_output=True, text=True, timeout=600)
    assert stock.returncode != 0 and "KeyError: 'exp_avg'" in stock.stderr
    shutil.rmtree(f"{ckpt}/stock", ignore_errors=True)
    d2u.convert(f"{ckpt}/global_step{N}", f"{ckpt}/global_step{N}_universal")
    atom = os.path.join(ckpt, f"global_step{N}_universal", "zero", "language_model.output_layer.weight")
    assert sorted(os.listdir(atom)) == ["fp32.pt", "momentum_buffer.pt"]
    buf = torch.load(os.path.join(atom, "momentum_buffer.pt"), weights_only=False)["param"]
    assert buf.shape == (512, 64) and buf.abs().sum() > 0
    out = str(tmp_path / "run")
    run_trainer(targs(data_list, out, zero=1, extra=(*sgd, "--load", ckpt, "--universal-checkpoint")))
    got = metrics(out)
    for i in range(N + 1, 2 * N + 1):
        assert abs(got[i]["lm_loss"] - want[i]["lm_loss"]) <= 1e-6, (i, got[i], want[i])


# ----------------------------------------------------------------------------- the two CPT recipes
@pytest.fixture(scope="module")
def universal_end(phase1, tmp_path_factory):
    """The end-of-phase-1 checkpoint (iteration 2N, at LR_max) converted with the launcher helper
    `convert_ckpt_to_universal` exactly as the guide does."""
    save, _ = phase1
    ckpt = copy_ckpt(save, str(tmp_path_factory.mktemp("cpt") / "ckpt"), f"global_step{2 * N}")
    proc = subprocess.run(["bash", "-c", f'source "{ROOT}/ALCF/helpers.sh" && convert_ckpt_to_universal "$1"',
                           "_", ckpt], env={**env_for(1), "PYTHON": sys.executable}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"global step: {2 * N}" in proc.stdout
    assert ck.read_tag(ckpt, universal=True) == f"global_step{2 * N}_universal"
    return ckpt


CPT_ITERS = 8  # 64 samples


def test_cpt_rewarm(universal_end, data_list, tmp_path):
    """Recipe 1 (replay + rewarm): --universal-checkpoint --finetune, LR_WARMUP_FRACTION=0.25 ->
    the LR climbs from 0 to LR over 16 samples (2 iterations), then cosine to MIN_LR. The optimizer
    starts fresh: identical to a module-only --finetune of the unconverted checkpoint."""
    rewarm = ("--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.25", "--finetune")
    out = str(tmp_path / "uni")
    run_trainer(targs(data_list, out, iters=CPT_ITERS, extra=(*rewarm, "--load", universal_end,
                                                              "--universal-checkpoint")))
    got = metrics(out)
    assert sorted(got) == list(range(1, CPT_ITERS + 1)) and got[1]["consumed_samples"] == 8
    # metrics' lr = LR for the next step: after step i, lr_at(8 i samples); warmup W = 16 samples
    assert got[1]["lr"] == pytest.approx(LR * 8 / 16, rel=1e-9)
    assert got[2]["lr"] == pytest.approx(LR, rel=1e-9)
    for i in range(3, CPT_ITERS + 1):  # cosine over samples 16..64
        r = (8 * i - 16) / (64 - 16)
        assert got[i]["lr"] == pytest.approx(MIN_LR + 0.5 * (1 + math.cos(math.pi * r)) * (LR - MIN_LR), rel=1e-9)
    # same run from the plain DeepSpeed checkpoint (module-only load): same weights, fresh optimizer
    plain = str(tmp_path / "plain")
    run_trainer(targs(data_list, plain, iters=CPT_ITERS, extra=(*rewarm, "--load", universal_end)))
    ref = metrics(plain)
    for i in got:
        assert abs(got[i]["lm_loss"] - ref[i]["lm_loss"]) <= 1e-6, (i, got[i]["lm_loss"], ref[i]["lm_loss"])


def test_cpt_phase2_constant_plus_cooldown(universal_end, phase1, data_list, tmp_path):
    """Recipe 2 (phase 1 -> phase 2): LR_WARMUP_FRAC=0 + --lr_constant_plus_cooldown: LR_max from
    the first step, 1-sqrt cooldown over the last 25% (16 of 64 samples) to MIN_LR; no warning."""
    out = str(tmp_path / "p2")
    proc = run_trainer(targs(data_list, out, iters=CPT_ITERS, extra=(
        "--lr-decay-style", "constant", "--lr-warmup-fraction", "0", "--lr_constant_plus_cooldown",
        "--lr_constant_plus_cooldown_frac", "0.25", "--universal-checkpoint", "--finetune", "--load", universal_end)))
    assert "already in its cooldown" not in proc.stdout + proc.stderr
    got = metrics(out)
    for i in range(1, CPT_ITERS + 1):
        n = 8 * i
        want = LR if n < 48 else (MIN_LR if n >= 64 else MIN_LR + (1 - math.sqrt((n - 48) / 16)) * (LR - MIN_LR))
        assert got[i]["lr"] == pytest.approx(want, rel=1e-9), i
    # step 1 sees the same first batch as phase 1's step 1, now with trained weights
    assert got[1]["lm_loss"] < phase1[1][1]["lm_loss"] - 0.3, (got[1], phase1[1][1])


# ----------------------------------------------------------------------------- Hugging Face
def test_to_hf_and_back(phase1, data_list, tmp_path):
    """to_hf.py output loads offline with AutoModelForCausalLM and gives our logits (<= 1e-5);
    from_hf.py of that directory trains 1 step from the same weights."""
    from transformers import AutoModelForCausalLM

    from megatron.config import Config
    from megatron.model import GPTModel
    from megatron.training import model_config
    from tools.convert_checkpoint import from_hf, to_hf

    save, _ = phase1
    hf_dir = str(tmp_path / "hf")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools/convert_checkpoint/to_hf.py"), "--load", save,
                           "--output", hf_dir], env={**env_for(1), "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.json", "model.safetensors"} <= set(os.listdir(hf_dir))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    args = to_hf.saved_args(os.path.join(save, f"global_step{2 * N}"))
    ours = GPTModel(model_config(Config.from_saved(args)))
    ours.load_state_dict(to_hf.load_fp32_weights(save, f"global_step{2 * N}"))
    ours.eval()
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(tokens)
        got = hf(tokens).logits
    assert want.shape == got.shape == (2, 16, 512)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    ckpt = str(tmp_path / "from_hf")
    info = from_hf.convert(hf_dir, ckpt)
    assert info["padded_vocab_size"] == 512 and ck.read_tag(ckpt) == "global_step0"
    # one --finetune step from the imported checkpoint == one from the original: the round trip is exact
    for name, src in (("ft", ckpt), ("ft-orig", save)):
        run_trainer(targs(data_list, str(tmp_path / name), iters=1, extra=("--lr-decay-style", "constant",
                                                                          "--load", src, "--finetune")))
    got, ref = metrics(str(tmp_path / "ft")), metrics(str(tmp_path / "ft-orig"))
    assert sorted(got) == [1] and abs(got[1]["lm_loss"] - ref[1]["lm_loss"]) <= 1e-6, (got, ref)


def test_guide_phase2_command_maps_to_flags(tmp_path):
    """The guide's phase-2 command through the launcher (DRY_RUN): LR_WARMUP_FRAC=0.0 becomes
    --lr-warmup-fraction 0.0 and the user's CPT flags reach the trainer."""
    data = tmp_path / "list.txt"
    data.write_text("")
    env = {**os.environ, "DRY_RUN": "1", "DATA_FILE_LIST": str(data), "LOAD": str(tmp_path / "ck"),
           "TRAIN_TOKENS": str(22 * 10**9), "GRAD_ACC_STEPS": "16", "LR": "0.0002", "LR_DECAY_STYLE": "constant",
           "LR_WARMUP_FRAC": "0.0"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "train_alcf.sh"), "--universal-checkpoint", "--finetune",
                           "--lr_constant_plus_cooldown"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln.strip().rstrip("\\").strip() for ln in proc.stdout.splitlines()]
    for flag in ("--lr-warmup-fraction 0.0", "--lr-decay-style constant", f"--load={tmp_path / 'ck'}",
                 "--universal-checkpoint", "--finetune", "--lr_constant_plus_cooldown"):
        assert flag in lines, (flag, lines)


def test_converter_refuses_unrepresentable_state():
    """Scalar states other than step and non-elementwise tensors: a message, not a wrong checkpoint."""
    flat, scalars = d2u._flat_states({"momentum_buffer": torch.ones(6), "step": torch.tensor(3.0)}, 6, "g0")
    assert list(flat) == ["momentum_buffer"] and list(scalars) == ["step"]
    with pytest.raises(d2u.ConversionError, match="scalar optimizer state 'k'"):
        d2u._flat_states({"k": 5}, 6, "g0")
    with pytest.raises(d2u.ConversionError, match="'row_factor' has shape \\(2, 3\\)"):
        d2u._flat_states({"row_factor": torch.ones(2, 3)}, 6, "g0")
    with pytest.raises(d2u.ConversionError, match="'col' has shape \\(2,\\)"):
        d2u._flat_states({"col": torch.ones(2)}, 6, "g0")


@pytest.mark.parametrize("files,match", [
    (["layer_01-model_00-model_states.pt", "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"],
     "pipeline-parallel checkpoint saved at ZeRO stage 0 .* resume it with the same PP size, or train with "
     "ZERO_STAGE=1"),
    (["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_01_model_states.pt",
      "zero_pp_rank_0_mp_rank_00_optim_states.pt"], "ZeRO-3 checkpoint with TP=2: .* supports TP=1 only"),
])
def test_universal_refuses_layouts(tmp_path, files, match):
    """Layouts the converter cannot handle are refused with the reason before anything is read or written."""
    src = tmp_path / "global_step4"
    src.mkdir()
    for f in files:
        (src / f).write_bytes(b"")
    with pytest.raises(d2u.ConversionError, match=match):
        d2u.convert(str(src), str(tmp_path / "global_step4_universal"))
    assert not (tmp_path / "global_step4_universal").exists() and not (tmp_path / "latest_universal").exists()
