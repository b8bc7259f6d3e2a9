"""Universal conversion at any parallel layout (tools/convert_checkpoint/ds_to_universal.py, to_hf.py).

The matrix: a checkpoint written on 2 gloo ranks at (TP, PP, DP, ZeRO) = (2,1,1,1), (1,2,1,1) and
(1,1,2,3) after step 1 of 3 -> universal -> loaded at (1,1,1,1) and at (1,1,2,2):

* the logits of a fixed batch equal those of the model the checkpoint holds (<= 1e-5, fp32), read by
  a path independent of the converter: the TP=2 engine loading the unconverted checkpoint, the
  pipeline's layer files (GPTModel names), DeepSpeed's own zero_to_fp32 merge of the ZeRO-3
  partitions;
* steps 2 and 3 of the converted run equal the unconverted 2-rank continuation (step 3 reads the
  converted Adam moments and step count).

Notes on the cells: a TP=2 run with one data-parallel replica trains at ZeRO stage 0 (the trainer's
single-replica rule, arguments.single_replica_zero_stage): its optimizer state is in the model files
and converts through the stage 0 path. A pipeline checkpoint's atoms are renamed to GPTModel names, so
the universal checkpoint loads at PP = 1. Cells that cannot convert are refused, each tested where its
refusal lives: loading a universal checkpoint at PP > 1 (tests/test_pipeline_parallel.py
REFUSED: DeepSpeed's universal loader targets the ZeRO-1/2 optimizer of a PP = 1 engine), a pipeline
checkpoint saved at ZeRO stage 0, a ZeRO-3 checkpoint with TP > 1
(tests/test_convert_checkpoint.py::test_universal_refuses_layouts).

Also: to_hf.py on the PP = 2 checkpoint gives HF LlamaForCausalLM logits equal to the PP = 1 model
holding the same weights (<= 1e-5).
"""
from __future__ import annotations

import os

import pytest
import torch
from distributed import TINY_MODEL, become_rank, free_port, make_dataset, read_metrics, run_trainer, spawn

from megatron.checkpoint import checkpointing as ck
from tools.convert_checkpoint import ds_to_universal as d2u

pytestmark = pytest.mark.slow
ITERS, SAVED = 3, 1  # checkpoint after step 1; steps 2 and 3 are the continuation
SOURCES = {  # name: flags of the writing run, all on 2 ranks (each its own seed: three different models)
    "tp2": ["--tensor-model-parallel-size", "2", "--zero-stage", "1", "--seed", "11"],
    "pp2": ["--pipeline-model-parallel-size", "2", "--zero-stage", "1", "--seed", "12"],
    "zero3": ["--zero-stage", "3", "--seed", "13"],
}
TARGETS = {"tp1pp1dp1z1": (1, "1"), "tp1pp1dp2z2": (2, "2")}  # name: (ranks = DP, ZeRO stage)
TOKENS = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(5))


def train_args(data_list: str, out: str, *extra: str) -> list[str]:
    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(ITERS),
        "--lr", "0.003", "--lr-decay-style", "constant", "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--adam-beta2", "0.95", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
        "--num-workers", "0", "--deepspeed", "--metrics-file", os.path.join(out, "metrics.jsonl"),
        *extra,
    ]


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("toy-data")))


@pytest.fixture(scope="module")
def sources(data_list, tmp_path_factory) -> dict:
    """Each source layout trained 3 steps on 2 ranks (checkpoint after step 1), its step-1 checkpoint
    converted to universal in a copy: {name: (plain save dir, universal dir, per-step losses)}."""
    out = {}
    for name, flags in SOURCES.items():
        d = str(tmp_path_factory.mktemp(name))
        save = os.path.join(d, "ckpt")
        run_trainer(train_args(data_list, d, *flags, "--save", save, "--save-interval", str(SAVED)),
                    nproc=2, launcher="ranks")
        conv = os.path.join(d, "converted")
        os.makedirs(conv)
        tag = f"global_step{SAVED}"
        os.symlink(os.path.join(save, tag), os.path.join(conv, tag))
        assert d2u.convert(os.path.join(conv, tag), os.path.join(conv, tag + "_universal")) == tag + "_universal"
        out[name] = (save, conv, read_metrics(os.path.join(d, "metrics.jsonl"))[0])
    return out


def test_pipeline_atoms_named_as_pp1(sources):
    """The PP = 2 checkpoint's universal atoms carry GPTModel names (not the stages' positions), and its
    model file is one PP = 1 file holding the whole module."""
    _, conv, _ = sources["pp2"]
    uni = os.path.join(conv, f"global_step{SAVED}_universal")
    atoms = sorted(n for n in os.listdir(os.path.join(uni, "zero")) if n != "optimizer_state.pt")
    model = torch.load(os.path.join(uni, "mp_rank_00_model_states.pt"), weights_only=False)
    assert sorted(model["module"]) == atoms and len(atoms) == 15  # 2 layers x 6 + embedding, final norm, head
    assert "language_model.encoder.layers.1.mlp.dense_4h_to_h.weight" in atoms
    assert [f for f in os.listdir(uni) if f.endswith("model_states.pt")] == ["mp_rank_00_model_states.pt"]
    head = os.path.join(uni, "zero", "language_model.output_layer.weight")
    assert sorted(os.listdir(head)) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]


# ----------------------------------------------------------------------------- logits
def _logits_worker(rank: int, nproc: int, port: int, argv: list, loads: dict, out: str) -> None:
    """One process group: build the engine of `argv` for each {name: (load dir, extra flags)} in turn,
    load it through checkpointing.load_checkpoint, and save the logits of TOKENS (rank 0)."""
    become_rank(rank, nproc, port)
    from megatron.arguments import parse_args
    from megatron.config import Config
    from megatron.initialize import initialize_megatron
    from megatron.training import build_tokenizer_and_vocab, setup_model_and_optimizer

    first = parse_args(argv)
    initialize_megatron(first)
    result = {}
    for name, (load, extra) in loads.items():
        args = parse_args(argv + ["--load", load, *extra])
        args.rank, args.local_rank, args.device_type = first.rank, first.local_rank, first.device_type
        build_tokenizer_and_vocab(args)
        _model, engine = setup_model_and_optimizer(args)
        state = ck.load_checkpoint(engine, Config.from_args(args))
        engine.module.eval()
        with torch.no_grad():
            result[name] = (engine.module(TOKENS), state.iteration)
        engine.destroy()
    if rank == 0:
        torch.save(result, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def logits_of(nproc: int, loads: dict, out: str, *flags: str) -> dict:
    argv = TINY_MODEL + ["--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "1",
                         "--data-path", "unused", "--deepspeed", "--seed", "1", "--lr", "1e-3",
                         "--use-checkpoint-opt_param-scheduler", *flags]
    spawn(_logits_worker, (nproc, free_port(), argv, loads, out), nproc)
    return torch.load(out, weights_only=False)


def gpt_logits(weights: dict, save: str) -> torch.Tensor:
    """Logits of TOKENS from a PP = 1 GPTModel holding `weights` (the checkpoint's own model arguments)."""
    from megatron.config import Config

    from megatron.model import GPTModel
    from megatron.training import model_config
    from tools.convert_checkpoint.to_hf import saved_args

    model = GPTModel(model_config(Config.from_saved(saved_args(os.path.join(save, f"global_step{SAVED}")))))
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.eval()
    with torch.no_grad():
        return model(TOKENS)


@pytest.fixture(scope="module")
def reference_logits(sources, tmp_path_factory) -> dict:
    """The logits of each source's step-1 model, read without the converter."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megatron.model.gpt_pipeline import read_pipeline_checkpoint

    d = tmp_path_factory.mktemp("ref")
    tp2 = logits_of(2, {"tp2": (sources["tp2"][0], ("--load-tag", f"global_step{SAVED}"))}, str(d / "tp2.pt"),
                    "--tensor-model-parallel-size", "2", "--zero-stage", "1")["tp2"]
    assert tp2[1] == SAVED
    pp2 = read_pipeline_checkpoint(os.path.join(sources["pp2"][0], f"global_step{SAVED}"), 2, untied=True)
    zero3 = get_fp32_state_dict_from_zero_checkpoint(sources["zero3"][0], tag=f"global_step{SAVED}")
    return {"tp2": tp2[0], "pp2": gpt_logits(pp2, sources["pp2"][0]), "zero3": gpt_logits(zero3, sources["zero3"][0])}


@pytest.mark.parametrize("target", list(TARGETS))
def test_logits_after_universal_load(sources, reference_logits, tmp_path, target):
    nproc, zero = TARGETS[target]
    loads = {name: (conv, ("--universal-checkpoint",)) for name, (_, conv, _) in sources.items()}
    got = logits_of(nproc, loads, str(tmp_path / "got.pt"), "--zero-stage", zero)
    for name, want in reference_logits.items():
        logits, iteration = got[name]
        assert iteration == SAVED and logits.shape == want.shape == (2, 32, 512), name
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # three different models (not one checkpoint loaded three times)
    pairs = (("tp2", "pp2"), ("pp2", "zero3"), ("tp2", "zero3"))
    assert min((got[a][0] - got[b][0]).abs().max() for a, b in pairs) > 1e-2


# ----------------------------------------------------------------------------- the next steps
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_next_steps_equal_unconverted_continuation(sources, data_list, tmp_path, source, target):
    """Steps 2 and 3 from the universal checkpoint at the target layout equal the source run's own
    steps 2 and 3 (same data, weights, Adam moments, step count)."""
    nproc, zero = TARGETS[target]
    _, conv, want = sources[source]
    seed = SOURCES[source][-2:]  # the data order (and the RNG state the checkpoint restores) of the source run
    run_trainer(train_args(data_list, str(tmp_path), *seed, "--zero-stage", zero, "--load", conv,
                           "--universal-checkpoint"),
                nproc=nproc, launcher="ranks")
    got, _ = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert sorted(got) == [2, 3]
    for i in got:
        assert abs(got[i] - want[i]) <= 1e-5, (source, target, i, got[i], want[i])
    assert abs(want[3] - want[2]) > 1e-3  # the steps moved the loss: an unconverted moment would show


# ----------------------------------------------------------------------------- Hugging Face from PP = 2
def test_to_hf_from_pp2(sources, tmp_path):
    """to_hf.py on the PP = 2 checkpoint (the stages' layers merged, fp32 masters from the ZeRO
    shards) -> LlamaForCausalLM gives the logits of the PP = 1 GPTModel holding the pipeline's layer
    weights (<= 1e-5)."""
    from transformers import LlamaForCausalLM

    from megatron.model.gpt_pipeline import read_pipeline_checkpoint
    from tools.convert_checkpoint import to_hf

    save = sources["pp2"][0]
    info = to_hf.export(save, str(tmp_path / "hf"), tag=f"global_step{SAVED}")
    assert info["tensors"] == 2 * 9 + 3  # per layer: q, k, v, o, gate, up, down, 2 norms; embed, norm, head
    assert not os.path.exists(os.path.join(save, "latest_universal"))  # the merge used a temporary folder
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    want = gpt_logits(read_pipeline_checkpoint(os.path.join(save, f"global_step{SAVED}"), 2, untied=True), save)
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, want, rtol=0, atol=1e-5)
