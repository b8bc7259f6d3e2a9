"""Ulysses sequence parallelism (megatron/core/sequence_parallel.py) on 2 gloo ranks, and the
launcher's SP=2 and TP=2 runs.

References: full-sequence causal attention (`scaled_dot_product_attention` on one process) for
the all-to-all layout; the same GPTModel at SP = 1 (itself checked against HF LlamaForCausalLM in
test_model.py), built from the same seed in the same process, for the model; the 1-rank trainer
for the 2-rank SP=2 trainer (same global batch, fp32): losses, gradient norms and the weights
saved after 3 steps must agree to 1e-5.
"""
from __future__ import annotations

import glob
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state as ps
from megatron.core import sequence_parallel as ulysses
from megatron.model import GPTConfig, GPTModel

from distributed import parallel_test_config

SP = 2
VOCAB, SEQ, BATCH = 256, 16, 2
CONFIGS = {  # name -> GPTConfig overrides (SP = 1 and SP = 2 models alike)
    "gqa-rope": {},
    "mha-tied-rope500k-partial": {"num_key_value_heads": 4, "untie_embeddings_and_output_weights": False,
                                  "rope_theta": 500000.0, "rotary_percent": 0.5},
    "gpt2-learned-positions": {"swiglu": False, "normalization": "layernorm", "use_rotary_position_embeddings": False,
                               "add_bias_linear": True, "num_key_value_heads": 4},
    "gqa-selective-recompute": {"recompute_granularity": "selective"},
    "gqa-full-recompute": {"recompute_granularity": "full"},  # the all-to-alls rerun in the backward
}


def config(**kw) -> GPTConfig:
    cfg = parallel_test_config(**kw)
    assert cfg.vocab_size == VOCAB
    return cfg


def batch():
    gen = torch.Generator().manual_seed(1)
    tok = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.roll(tok, -1, dims=1)
    mask = torch.ones(BATCH, SEQ)
    mask[:, -1] = 0.0
    mask[0, 3] = mask[1, 10:14] = 0.0  # uneven masking: rank 1 holds fewer loss tokens than rank 0
    return tok, labels, mask


def train_steps(model, tok, labels, mask, steps: int = 3, sp_group=None) -> list[float]:
    """3 AdamW steps on the masked-mean loss. With `sp_group` (SP = 2), gradients are summed over
    it, as DeepSpeed does over the SP ranks of its sequence+data-parallel group."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1, eps=1e-5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ulysses.whole_sequence_loss(model(tok, labels=labels), mask)
        loss.backward()
        if sp_group is not None:
            for p in model.parameters():
                dist.all_reduce(p.grad, group=sp_group)
        opt.step()
        losses.append(loss.item())
    return losses


def _attention_check(rank: int) -> dict:
    """DistributedAttention's layout: each rank's attention sees the whole sequence on its half of
    the heads (and the matching KV heads), and the result is the full attention's shard."""
    b, h, kv, s, d = 2, 4, 2, 8, 4
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, n, s, d, generator=gen) for n in (h, kv, kv))
    w = torch.randn(b, h, s, d, generator=gen)  # weights of the scalar whose gradient is compared
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True)
    (ref * w).sum().backward()
    seen = {}

    def attend(qq, kk, vv):
        seen.update(q=qq.detach().clone(), k=kk.detach().clone(), v=vv.detach().clone())
        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)

    layer = ulysses.ulysses_attention(attend, h, kv)
    shards = [ulysses.shard(t, dim=2).requires_grad_(True) for t in (q, k, v)]
    out = layer(*shards)
    (out * ulysses.shard(w, dim=2)).sum().backward()
    lo, hi = rank * s // SP, (rank + 1) * s // SP
    return {
        "shard_shape": tuple(shards[0].shape), "out_shape": tuple(out.shape), "seen_shape": tuple(seen["q"].shape),
        "seen_q": torch.equal(seen["q"], q[:, rank * h // SP:(rank + 1) * h // SP]),
        "seen_kv": torch.equal(seen["k"], k[:, rank * kv // SP:(rank + 1) * kv // SP])
        and torch.equal(seen["v"], v[:, rank * kv // SP:(rank + 1) * kv // SP]),
        "out": (out.detach() - ref.detach()[:, :, lo:hi]).abs().max().item(),
        "grads": max((t.grad - f.grad[:, :, lo:hi]).abs().max().item() for t, f in zip(shards, full)),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(SP),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    torch.set_num_threads(1)
    tok, labels, mask = batch()
    refs = {}
    for name, kw in CONFIGS.items():  # SP = 1 references, before the SP group exists
        torch.manual_seed(7)
        ref = GPTModel(config(**kw))
        init = {n: p.detach().clone() for n, p in ref.named_parameters()}
        loss = ulysses.whole_sequence_loss(ref(tok, labels=labels), mask)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        with torch.no_grad():
            logits = ref(tok)
        refs[name] = (init, logits, loss.detach(), grads, train_steps(ref, tok, labels, mask),
                      {n: p.detach().clone() for n, p in ref.named_parameters()})

    import deepspeed  # noqa: PLC0415  (DistributedAttention talks through deepspeed.comm)

    from megatron.deepspeed_compat import skip_shm_inference_op  # noqa: PLC0415

    skip_shm_inference_op()  # as the trainer: no C++ all-reduce op compiled in a fresh environment
    dist.init_process_group("gloo", rank=rank, world_size=SP)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    ps.initialize_model_parallel(1, 1, SP)
    results = {"state": (ps.get_sequence_parallel_rank(), ps.get_sequence_parallel_world_size(),
                         ps.get_data_parallel_world_size(), ps.get_sequence_data_parallel_world_size(),
                         ps.get_sequence_data_parallel_rank(), ps.get_data_parallel_rank())}
    try:
        results["attention"] = _attention_check(rank)
        group = ps.get_sequence_parallel_group()
        for name, kw in CONFIGS.items():
            init, logits, loss, grads, losses, final = refs[name]
            torch.manual_seed(7)
            model = GPTModel(config(**kw))
            r = {"init": max((p - init[n]).abs().max().item() for n, p in model.named_parameters())}
            t, lab, m = (ulysses.shard(x) for x in (tok, labels, mask))
            with torch.no_grad():  # logits of this rank's positions
                r["logits"] = (model(t) - ulysses.shard(logits)).abs().max().item()
            got = ulysses.whole_sequence_loss(model(t, labels=lab), m)
            r["loss"] = abs(got.item() - loss.item())
            got.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad, group=group)
            r["grads"] = max((p.grad - grads[n]).abs().max().item() for n, p in model.named_parameters())
            sp_losses = train_steps(model, t, lab, m, sp_group=group)
            r["train_losses"] = max(abs(a - b) for a, b in zip(sp_losses, losses))
            diffs = {n: (p.detach() - final[n]).abs().max().item() for n, p in model.named_parameters()}
            r["params_after_3_steps"] = max(diffs.values())
            r["worst"] = max(diffs, key=diffs.get)
            r["moved"] = min((final[n] - init[n]).abs().max().item() for n in final)
            results[name] = r
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    from distributed import spawn_workers

    return spawn_workers(_worker, SP, str(tmp_path_factory.mktemp("sp")))


@pytest.mark.slow  # 2 spawned ranks (one fixture for all of these)
def test_groups_and_ranks(sp_results):
    # (sp rank, SP, DP, SP x DP, sequence+data rank, DP rank) on 2 ranks with SP = 2
    assert [r["state"] for r in sp_results] == [(0, 2, 1, 2, 0, 0), (1, 2, 1, 2, 1, 0)]


def test_rank_groups_layout():
    # TP adjacent, then SP, then DP, then PP: rank = pp * 8 + dp * 4 + sp * 2 + tp for TP = SP = DP = PP = 2
    g = ps.rank_groups(16, tp=2, pp=2, sp=2)
    assert g["tp"][:2] == [[0, 1], [2, 3]]
    assert g["sp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert g["dp"][:3] == [[0, 4], [1, 5], [2, 6]]
    assert g["sdp"][:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["pp"][:2] == [[0, 8], [1, 9]]
    for kind in ("tp", "sp", "dp", "pp"):  # each kind partitions the ranks
        assert sorted(r for grp in g[kind] for r in grp) == list(range(16))
    assert ps.rank_groups(4, 2, 1)["dp"] == ps.rank_groups(4, 2, 1, 1)["dp"] == [[0, 2], [1, 3]]  # SP = 1 unchanged


@pytest.mark.slow  # 2 spawned ranks (one fixture for all of these)
def test_all_to_all_layout(sp_results):
    for rank, results in enumerate(sp_results):
        a = results["attention"]
        assert a["shard_shape"] == (2, 4, 4, 4) and a["out_shape"] == (2, 4, 4, 4)  # [b, heads, s/SP, d]
        assert a["seen_shape"] == (2, 2, 8, 4)  # the local attention: heads/SP heads over the whole sequence
        assert a["seen_q"] and a["seen_kv"], rank  # rank r: query heads 2r, 2r+1 with their KV head r
        assert a["out"] <= 1e-6 and a["grads"] <= 1e-6, a


@pytest.mark.slow  # 2 spawned ranks (one fixture for all of these)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sp2_model_matches_sp1(sp_results, name):
    for results in sp_results:
        r = results[name]
        assert r["init"] == 0.0
        assert r["logits"] <= 1e-5 and r["loss"] <= 1e-5, r
        assert r["grads"] <= 1e-5, r
        assert r["train_losses"] <= 1e-5 and r["params_after_3_steps"] <= 1e-5, (r["worst"], r["params_after_3_steps"])
        assert r["moved"] > 1e-3  # every parameter moved by far more than the tolerance


def test_shard_and_loss_single_process():
    """At SP = 1 (no group) the helpers are the identity and the plain masked mean."""
    x = torch.arange(12.0).view(2, 6)
    assert ulysses.shard(x) is x and ulysses.shard_position_ids(6, "cpu") is None
    losses, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    assert ulysses.whole_sequence_loss(losses, mask).item() == pytest.approx(2.0)
    assert ulysses.ulysses_attention(lambda q, k, v: q, 4, 2) is None


# ----------------------------------------------------------------------------- argument checks
BASE = ["--num-layers", "2", "--hidden-size", "96", "--num-attention-heads", "6", "--num-key-value-heads", "3",
        "--seq-length", "31", "--lr", "1e-3", "--train-iters", "3", "--data-path", "x"]


def _errors(argv: list[str], world: int) -> list[str]:
    from megatron.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError) as e:
        parse_args(argv, env={"WORLD_SIZE": str(world)})
    return str(e.value).splitlines()


def test_sp_refusals():
    lines = _errors(BASE + ["--ds-sequence-parallel-size", "4"], 4)
    assert any("--num-attention-heads (6) must be divisible by --ds-sequence-parallel-size (4)" in ln for ln in lines)
    assert any("--num-key-value-heads (3) must be divisible by --ds-sequence-parallel-size (4)" in ln for ln in lines)
    assert any("--seq-length (31) must be divisible by --ds-sequence-parallel-size (4)" in ln for ln in lines)
    assert not any("not supported by this version" in ln for ln in lines)  # SP itself is no longer refused
    lines = _errors(BASE + ["--ds-sequence-parallel-size", "3"], 4)  # 4 ranks, SP 3
    assert any("world size 4 is not divisible by TP*PP*SP = 1*1*3 = 3" in ln for ln in lines)
    good = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2",
            "--seq-length", "32", "--lr", "1e-3", "--train-iters", "3", "--data-path", "x",
            "--ds-sequence-parallel-size", "2"]
    lines = _errors(good + ["--tensor-model-parallel-size", "2", "--optimizer", "sophiag", "--compile",
                            "--zero-stage", "3"], 4)
    assert not any("Ulysses" in ln and "zero-stage" in ln for ln in lines)  # SP + ZeRO-3 runs (test_sp_zero3.py)
    assert any("together with tensor parallelism (TP=2) is not supported yet" in ln for ln in lines)
    assert any("--optimizer sophiag is not supported with Ulysses" in ln for ln in lines)
    assert any("--compile is not supported with Ulysses" in ln for ln in lines)
    from megatron.arguments import parse_args

    ok = parse_args(good + ["--micro-batch-size", "2", "--global-batch-size", "8"], env={"WORLD_SIZE": "4"})
    assert ok.data_parallel_size == 2 and ok.num_micro_batches == 2  # DP = world / SP


# ----------------------------------------------------------------------------- the trainer
ITERS = 3


def _trainer_args(data_list: str, out: str, *extra: str) -> list[str]:
    from distributed import TINY_MODEL

    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(ITERS),
        "--lr", "0.003", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--weight-decay", "0.1", "--clip-grad", "0.3", "--adam-beta2", "0.95",  # clipping active
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "2", "--num-workers", "0",
        "--zero-stage", "1", "--deepspeed", "--seed", "1234", "--eod-mask-loss",
        "--save", os.path.join(out, "ckpt"), "--metrics-file", os.path.join(out, "metrics.jsonl"), *extra,
    ]


def _records(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if "lm_loss" in r}


def _weights(out: str) -> dict[str, torch.Tensor]:
    path = os.path.join(out, "ckpt", f"global_step{ITERS}", "mp_rank_00_model_states.pt")
    return torch.load(path, weights_only=False)["module"]


@pytest.mark.slow
def test_trainer_sp2_matches_sp1(tmp_path):
    """1 rank vs 2 ranks with SP=2 (DP = 1 in both: the same 8 samples per step)."""
    from distributed import make_dataset, run_trainer

    data_list = make_dataset(str(tmp_path / "data"))
    one, two = str(tmp_path / "sp1"), str(tmp_path / "sp2")
    run_trainer(_trainer_args(data_list, one))
    proc = run_trainer(_trainer_args(data_list, two, "--ds-sequence-parallel-size", "2"), nproc=2,
                       launcher="ranks")
    r1, r2 = _records(os.path.join(one, "metrics.jsonl")), _records(os.path.join(two, "metrics.jsonl"))
    assert sorted(r1) == sorted(r2) == [1, 2, 3]
    for key in ("lm_loss", "grad_norm"):
        diffs = [abs(r1[i][key] - r2[i][key]) for i in r1]
        assert max(diffs) <= 1e-5, (key, diffs)
    assert min(r["grad_norm"] for r in r1.values()) > 0.3  # clipping was active
    assert r2[3]["consumed_samples"] == 3 * 8 and r2[3]["consumed_tokens"] == 3 * 8 * 32
    w1, w2 = _weights(one), _weights(two)
    assert sorted(w1) == sorted(w2)
    diffs = {n: (w1[n].float() - w2[n].float()).abs().max().item() for n in w1}
    assert max(diffs.values()) <= 1e-5, max(diffs, key=diffs.get)
    # ZeRO-1 partitions the optimizer over the sequence+data-parallel group (2 ranks): 2 shards
    step = os.path.join(two, "ckpt", f"global_step{ITERS}")
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(step, "zero_pp_rank_*"))) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert "1 / 1 / 2" in proc.stdout  # the start-up table: TP / PP / SP


# ----------------------------------------------------------------------------- the launcher
def _launch(demo_data: str, workdir, **env) -> tuple[dict, list, str]:
    from test_end_to_end import assert_clean, metrics_of, run_launcher

    proc = run_launcher(workdir, {"DATA_FILE_LIST": demo_data, "TRAIN_ITERS": "8", "MODEL_ARCH": "tiny",
                                  "NPROC": "2", "LAUNCHER": "mpiexec", "MICRO_BATCH": "4", "LR": "0.01",
                                  "LR_WARMUP_FRACTION": "0.1", **env}, "--eval-on-start")
    assert_clean(proc)
    train, val = metrics_of(workdir)
    return train, val, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("env,table", [({"SP": "2"}, "1 / 1 / 2 / 1"), ({"TP": "2"}, "2 / 1 / 1 / 1")],
                         ids=["SP=2", "TP=2"])
def test_launcher_model_parallel_run(demo_data, tmp_path, env, table):
    """`SP=2 bash train_alcf.sh` / `TP=2 bash train_alcf.sh` on 2 processes: DP = 1, so a step is
    MICRO_BATCH 4 x GAS 1 samples; the run finishes, saves, and its loss falls (the validation loss
    on the same samples before and after the 8 steps: about 9.2 -> 8.2)."""
    train, val, out = _launch(demo_data, tmp_path, **env)
    assert sorted(train) == list(range(1, 9))
    assert train[8]["consumed_samples"] == 8 * 4 and train[8]["consumed_tokens"] == 8 * 4 * 64
    assert train[8]["lm_loss"] < train[1]["lm_loss"] - 0.5, train
    assert [r["iteration"] for r in val] == [0, 8]
    assert val[1]["val_loss"] < val[0]["val_loss"] - 0.5, val
    assert table in out  # the launcher's summary: TP / PP / SP / DP
    (ckpt,) = glob.glob(os.path.join(str(tmp_path), "checkpoints", "tiny-ws2-*", "global_step8"))
    assert glob.glob(os.path.join(ckpt, "mp_rank_0*_model_states.pt"))
