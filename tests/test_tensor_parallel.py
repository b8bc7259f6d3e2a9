"""Tensor and sequence parallelism (megatron/core/tensor_parallel) on 2 gloo ranks.

The reference is the same GPTModel at TP = 1 (itself checked against HF LlamaForCausalLM in
test_model.py), built from the same seed in the same process: the TP = 2 model must hold the
same weights (shards gathered), give the same logits, loss and gradients, and the same weights
after 3 AdamW steps (torch.optim.AdamW on both). End-to-end: the trainer with
--tensor-model-parallel-size 2 on 2 ranks reproduces the 1-rank losses, saves mp_rank_00/01
checkpoints and resumes from them.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tp
from megatron.model import GPTConfig, GPTModel

from distributed import parallel_test_config

TP = 2
VOCAB, SEQ, BATCH = 256, 16, 2
CONFIGS = {  # name -> GPTConfig overrides
    "gqa-untied": {},
    "mha-tied-bias": {"num_key_value_heads": 4, "untie_embeddings_and_output_weights": False,
                      "add_bias_linear": True},
    "gqa-sp": {"sequence_parallel": True},
    "gpt2-sp-bias": {"swiglu": False, "normalization": "layernorm", "use_rotary_position_embeddings": False,
                     "add_bias_linear": True, "sequence_parallel": True, "num_key_value_heads": 4},
    "tied-sp-xavier": {"untie_embeddings_and_output_weights": False, "sequence_parallel": True,
                       "init_method_xavier_uniform": True, "rope_theta": 500000.0},
}


def config(**kw) -> GPTConfig:
    cfg = parallel_test_config(**kw)
    assert cfg.vocab_size == VOCAB
    return cfg


def batch():
    gen = torch.Generator().manual_seed(1)
    tok = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.roll(tok, -1, dims=1)
    labels[:, -1] = -100
    labels[0, 3] = -100
    return tok, labels


def train_steps(model, tok, labels, steps: int = 3) -> list[float]:
    # eps 1e-5, not 1e-8: some gradient entries are zero up to rounding (e.g. key rows that only
    # the first token attends), and Adam with a tiny eps turns a 1e-9 rounding difference in them
    # into an update difference of ~lr/3 -- in the TP=1 model run twice with another op order too.
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, eps=1e-5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(tok, labels=labels)
        loss = loss.sum() / (labels != -100).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tok, labels = batch()
    results = {}
    refs = {}
    for name, kw in CONFIGS.items():  # the TP = 1 references, before the TP group exists
        torch.manual_seed(7)
        ref = GPTModel(config(**{**kw, "sequence_parallel": False}))
        init = {n: p.detach().clone() for n, p in ref.named_parameters()}
        with torch.no_grad():
            logits = ref(tok)
        loss = ref(tok, labels=labels)
        loss.sum().backward()
        grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        refs[name] = (init, logits, loss.detach(), grads, train_steps(ref, tok, labels),
                      {n: p.detach().clone() for n, p in ref.named_parameters()})
    ce_logits = torch.randn(3, 5, VOCAB, generator=torch.Generator().manual_seed(2), requires_grad=True)
    ce_labels = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    ce_labels[1, 2] = -100
    ref_ce = F.cross_entropy(ce_logits.flatten(0, 1), ce_labels.flatten(), reduction="none").view(3, 5)
    (ref_ce * torch.arange(15.0).view(3, 5)).sum().backward()
    ref_ce_grad = ce_logits.grad.clone()

    dist.init_process_group("gloo", rank=rank, world_size=TP)
    ps.initialize_model_parallel(TP, 1)
    tp.model_parallel_manual_seed(1234)
    try:
        # vocab-parallel cross-entropy alone, on this rank's half of the vocabulary
        local = ce_logits.detach()[..., rank * VOCAB // TP:(rank + 1) * VOCAB // TP].clone().requires_grad_(True)
        ce = tp.vocab_parallel_cross_entropy(local, ce_labels)
        (ce * torch.arange(15.0).view(3, 5)).sum().backward()
        results["ce"] = ((ce - ref_ce.detach()).abs().max().item(),
                         (local.grad - ref_ce_grad[..., rank * VOCAB // TP:(rank + 1) * VOCAB // TP]).abs().max().item(),
                         ce[1, 2].item())
        for name, kw in CONFIGS.items():
            init, logits, loss, grads, losses, final = refs[name]
            torch.manual_seed(7)
            model = GPTModel(config(**kw))
            r = {"init": max((tp.gather_full(p) - init[n]).abs().max().item() for n, p in model.named_parameters())}
            # the layout: this rank's QKV rows are whole KV groups (their query heads, k, v)
            att = model.language_model.encoder.layers[0].self_attention
            local_qkv = att.query_key_value.weight.detach().clone()
            full_qkv = init["language_model.encoder.layers.0.self_attention.query_key_value.weight"]
            rows = full_qkv.shape[0] // TP
            with torch.no_grad():
                r["logits"] = (model(tok) - logits).abs().max().item()
            got = model(tok, labels=labels)
            r["loss"] = (got.detach() - loss).abs().max().item()
            got.sum().backward()
            r["grads"] = max((tp.gather_full(p, p.grad) - grads[n]).abs().max().item()
                             for n, p in model.named_parameters())
            tp_losses = train_steps(model, tok, labels)
            r["train_losses"] = max(abs(a - b) for a, b in zip(tp_losses, losses))
            diffs = {n: (tp.gather_full(p) - final[n]).abs().max().item() for n, p in model.named_parameters()}
            r["params_after_3_steps"] = max(diffs.values())
            r["worst"] = max(diffs, key=diffs.get)
            r["moved"] = min((final[n] - init[n]).abs().max().item() for n in final)
            r["local_numel"] = sum(p.numel() for p in model.parameters())
            r["qkv_rows"] = torch.equal(local_qkv, full_qkv[rank * rows:(rank + 1) * rows])
            r["local_heads"] = (att.n_heads, att.n_kv)
            results[name] = r
        # gate|up: rank r holds [gate_r; up_r]
        torch.manual_seed(7)
        m = GPTModel(config())
        full = refs["gqa-untied"][0]["language_model.encoder.layers.1.mlp.dense_h_to_4h.weight"]
        gate, up = full.chunk(2)
        f_local = gate.shape[0] // TP
        fresh = m.language_model.encoder.layers[1].mlp.dense_h_to_4h.weight.detach()
        results["gate_up"] = torch.equal(fresh, torch.cat([gate[rank * f_local:(rank + 1) * f_local],
                                                           up[rank * f_local:(rank + 1) * f_local]]))
        # activation checkpointing under TP + sequence parallel with dropout: the recomputation
        # replays the TP tracker's masks too, so the gradients are bit-identical
        recompute_grads = []
        for granularity in (None, "full", "selective"):
            torch.manual_seed(7)
            m = GPTModel(config(sequence_parallel=True, hidden_dropout=0.2, attention_dropout=0.2,
                                recompute_granularity=granularity))
            tp.model_parallel_manual_seed(99)
            m(tok, labels=labels).sum().backward()
            recompute_grads.append({n: p.grad for n, p in m.named_parameters()})
        results["recompute_bitwise"] = [all(torch.equal(g[n], recompute_grads[0][n]) for n in g)
                                        for g in recompute_grads[1:]]
        # dropout on TP-split activations draws per-rank masks; the default generator stays shared
        with tp.model_parallel_rng():
            split_mask = torch.rand(8)
        shared = torch.rand(8)
        both = [torch.empty(16) for _ in range(TP)]
        dist.all_gather(both, torch.cat([split_mask, shared]))
        results["rng"] = (torch.equal(both[0][:8], both[1][:8]), torch.equal(both[0][8:], both[1][8:]))
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    from distributed import spawn_workers

    return spawn_workers(_worker, TP, str(tmp_path_factory.mktemp("tp")))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp2_matches_tp1(tp_results, name):
    for rank, results in enumerate(tp_results):
        r = results[name]
        assert r["init"] == 0.0, "the TP=2 shards are cut from the TP=1 initialization"
        assert r["logits"] <= 1e-5 and r["loss"] <= 1e-5, r
        assert r["grads"] <= 1e-5, r
        assert r["train_losses"] <= 1e-5 and r["params_after_3_steps"] <= 1e-5, (r["worst"], r["params_after_3_steps"])
        assert r["moved"] > 1e-3  # every parameter changed by far more than the tolerance
        assert r["qkv_rows"]
        cfg = config(**CONFIGS[name])
        assert r["local_heads"] == (cfg.num_attention_heads // TP, cfg.num_key_value_heads // TP)
        # every matrix is split in two, norms (and row biases, position embeddings) replicated
        assert r["local_numel"] < cfg.num_parameters() * 0.55, (rank, r["local_numel"], cfg.num_parameters())


def test_vocab_parallel_cross_entropy(tp_results):
    for results in tp_results:
        loss_err, grad_err, ignored = results["ce"]
        assert loss_err <= 1e-5 and grad_err <= 1e-6
        assert ignored == 0.0


def test_gate_up_halves_split_separately(tp_results):
    assert all(r["gate_up"] for r in tp_results)


def test_recompute_with_tp_dropout_bit_identical(tp_results):
    assert all(all(r["recompute_bitwise"]) for r in tp_results)


def test_rng_tracker_per_rank_streams(tp_results):
    same_split, same_shared = tp_results[0]["rng"]
    assert not same_split and same_shared


def test_rng_tracker_fork_restores_default_state():
    tracker = tp.RNGStatesTracker()
    tracker.add("a", 99)
    torch.manual_seed(5)
    with tracker.fork("a"):
        first = torch.rand(4)
    after_default = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after_default, torch.rand(4))  # default stream untouched by the fork
    torch.manual_seed(99)
    assert torch.equal(first, torch.rand(4))  # the named stream is seeded with its seed
    with tracker.fork("a"):
        second = torch.rand(4)
    torch.manual_seed(99)
    torch.rand(4)
    assert torch.equal(second, torch.rand(4))  # and continues where it stopped
    with pytest.raises(ValueError):
        tracker.add("b", 99)


def test_shard_unshard_roundtrip():
    full = torch.arange(48.0).view(12, 4)
    for stride in (1, 2):
        pieces = [tp.shard(full, 0, stride, rank=r, world=2) for r in range(2)]
        assert torch.equal(tp.unshard(pieces, 0, stride), full)
    gate_up = tp.shard(full, 0, 2, rank=1, world=2)  # [gate rows 3..5; up rows 9..11]
    assert torch.equal(gate_up, torch.cat([full[3:6], full[9:12]]))
    assert torch.equal(tp.shard(full, 1, 1, rank=0, world=2), full[:, :2])


# ----------------------------------------------------------------------------- the trainer, end to end
ITERS = 6


def _trainer_args(data_list: str, out: str, *extra: str) -> list[str]:
    from distributed import TINY_MODEL

    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(ITERS),
        "--lr", "0.003", "--min-lr", "0.0003", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--weight-decay", "0.1", "--clip-grad", "0.3", "--adam-beta2", "0.95",  # clipping active (norms ~0.8)
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "2", "--num-workers", "0",
        "--zero-stage", "1", "--deepspeed", "--seed", "1234",
        "--metrics-file", os.path.join(out, "metrics.jsonl"), *extra,
    ]


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    from distributed import make_dataset

    return make_dataset(str(tmp_path_factory.mktemp("toy-data")))


@pytest.fixture(scope="module")
def tp1_losses(data_list, tmp_path_factory) -> dict:
    from distributed import read_metrics, run_trainer

    out = str(tmp_path_factory.mktemp("tp1"))
    run_trainer(_trainer_args(data_list, out))
    losses, _ = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert sorted(losses) == list(range(1, ITERS + 1))
    return _Losses(losses, os.path.join(out, "metrics.jsonl"))


class _Losses(dict):
    def __init__(self, losses: dict, path: str) -> None:
        super().__init__(losses)
        self.path = path


@pytest.fixture(scope="module")
def tp2_run(data_list, tmp_path_factory):
    """TP=2 on 2 ranks (DP=1: the same global batch as the 1-rank run), saving at iterations 3 and 6."""
    from distributed import read_metrics, run_trainer

    out = str(tmp_path_factory.mktemp("tp2"))
    proc = run_trainer(_trainer_args(data_list, out, "--tensor-model-parallel-size", "2",
                                     "--save", os.path.join(out, "ckpt"), "--save-interval", str(ITERS // 2)),
                       nproc=2, launcher="ranks")
    losses, _ = read_metrics(os.path.join(out, "metrics.jsonl"))
    return out, losses, proc.stdout


def _grad_norms(path: str) -> dict[int, float]:
    import json

    with open(path) as f:
        return {r["iteration"]: r["grad_norm"] for r in map(json.loads, f) if "grad_norm" in r}


def _assert_same(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    diffs = {i: abs(got[i] - want[i]) for i in want}
    assert max(diffs.values()) <= tol, diffs


@pytest.mark.slow
def test_trainer_tp2_matches_tp1(tp1_losses, tp2_run):
    out, losses, stdout = tp2_run
    _assert_same(losses, tp1_losses)
    # DeepSpeed's gradient norm (clipping at 0.3 is active) counts split and replicated parameters once
    norms1, norms2 = _grad_norms(tp1_losses.path), _grad_norms(os.path.join(out, "metrics.jsonl"))
    assert min(norms1.values()) > 0.3
    _assert_same(norms2, norms1)
    assert "TP / PP / SP" in stdout and "2 / 1 / 1" in stdout  # the start-up table shows TP 2
    step = os.path.join(out, "ckpt", f"global_step{ITERS}")
    # one model file per TP rank, holding its optimizer state: TP=2 on 2 ranks is one data-parallel
    # replica, so ZeRO-1 runs as stage 0 (no ZeRO shards)
    assert sorted(f for f in os.listdir(step) if f.endswith(".pt")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    states = [torch.load(os.path.join(step, f"mp_rank_0{r}_model_states.pt"), weights_only=False) for r in range(2)]
    assert all(sd["optimizer"]["state"] and sd["optimizer_param_names"] for sd in states)
    shards = [sd["module"] for sd in states]
    key = "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"
    assert shards[0][key].shape == (128, 64)  # [gate_r; up_r]: 2 x 128 / 2 rows of the full [256, 64]
    assert not torch.equal(shards[0][key], shards[1][key])
    norm = "language_model.encoder.final_layernorm.weight"
    assert torch.equal(shards[0][norm], shards[1][norm])  # replicated parameters stay identical


@pytest.mark.slow
def test_trainer_tp2_resume(tp2_run, data_list, tmp_path):
    """Resume the TP=2 checkpoint of iteration 3: iterations 4..6 repeat the uninterrupted run."""
    import shutil

    from distributed import read_metrics, run_trainer

    out, want, _ = tp2_run
    ckpt = os.path.join(str(tmp_path), "ckpt")
    shutil.copytree(os.path.join(out, "ckpt"), ckpt)
    half = ITERS // 2
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write(f"global_step{half}")
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(half))
    run_trainer(_trainer_args(data_list, str(tmp_path), "--tensor-model-parallel-size", "2", "--load", ckpt,
                              "--use-checkpoint-opt_param-scheduler"), nproc=2, launcher="ranks")
    got, _ = read_metrics(os.path.join(str(tmp_path), "metrics.jsonl"))
    _assert_same(got, {i: want[i] for i in range(half + 1, ITERS + 1)}, tol=1e-6)


@pytest.mark.slow
def test_trainer_tp2_sequence_parallel_recompute_zero2(tp1_losses, data_list, tmp_path):
    """Sequence parallelism, full activation checkpointing and ZeRO-2 together: still the same losses."""
    from distributed import read_metrics, run_trainer

    run_trainer(_trainer_args(data_list, str(tmp_path), "--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--checkpoint-activations", "--zero-stage", "2"), nproc=2, launcher="ranks")
    got, _ = read_metrics(os.path.join(str(tmp_path), "metrics.jsonl"))
    _assert_same(got, tp1_losses)


def test_tp_configuration_errors():
    from megatron.arguments import ArgumentError, parse_args

    base = ["--num-layers", "2", "--hidden-size", "96", "--num-attention-heads", "6", "--num-key-value-heads", "3",
            "--seq-length", "31", "--lr", "1e-3", "--train-iters", "3", "--data-path", "x", "--swiglu",
            "--ffn-hidden-size", "251"]
    with pytest.raises(ArgumentError) as e:
        parse_args(base + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], env={"WORLD_SIZE": "2"})
    lines = str(e.value).splitlines()
    assert any("--num-key-value-heads (3) must be divisible by --tensor-model-parallel-size (2)" in ln for ln in lines)
    assert any("FFN size (251) must be divisible" in ln for ln in lines)
    assert any("--seq-length (31) divisible" in ln for ln in lines)
    assert not any("not supported" in ln for ln in lines)  # TP itself is no longer refused
    good = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2",
            "--seq-length", "32", "--lr", "1e-3", "--train-iters", "3", "--data-path", "x", "--sequence-parallel"]
    ok = parse_args(good + ["--tensor-model-parallel-size", "2"], env={"WORLD_SIZE": "4"})
    assert ok.data_parallel_size == 2 and ok.sequence_parallel
    one = parse_args(good, env={"WORLD_SIZE": "1"})
    assert not one.sequence_parallel  # off at TP = 1, as upstream


def test_checkpoint_rng_state_includes_tracker():
    """The checkpoint's RNG state holds the TP tracker's streams, so dropout on split activations
    continues exactly after a resume."""
    from megatron.checkpoint.checkpointing import _rng_state, _set_rng_state

    tp.model_parallel_manual_seed(11)
    try:
        state = _rng_state()
        with tp.get_rng_tracker().fork():
            first = torch.rand(5)
        _set_rng_state(state)
        with tp.get_rng_tracker().fork():
            assert torch.equal(torch.rand(5), first)
    finally:
        ps.destroy_model_parallel()
