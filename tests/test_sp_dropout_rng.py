"""Dropout RNG under Ulysses sequence parallelism (megatron/core/tensor_parallel/random.py).

The two SP ranks hold different halves of the same sequences (and, inside attention, different
heads), so their dropout masks must come from different streams: the model-parallel stream,
seeded `seed + 2718 + tp_rank + tp_size * sp_rank` (Megatron's `seed + 2718 + tp_rank` at SP = 1 and
on SP rank 0). Checked on 2 gloo ranks against masks drawn independently here from a generator
with that seed, in distribution (keep rate, agreement between the ranks), and across a checkpoint
(the model file is written once for the SP group: each rank must get its own stream back).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as tp

from distributed import parallel_test_config, become_rank

SP, SEED, P = 2, 1234, 0.5
BATCH, SEQ, HIDDEN = 4, 16, 64


def _masks(model, tok):
    """Keep-masks of the embedding dropout and of both hidden dropouts of layer 0 for one forward."""
    got = []
    hooks = [m.register_forward_hook(lambda _m, i, o: got.append((o != 0) & (i[0] != 0)))
             for m in (model.language_model.embedding.embedding_dropout, model.language_model.encoder.layers[0].dropout)]
    model(tok)
    for h in hooks:
        h.remove()
    return got[:3]  # embedding, layer 0 after attention, layer 0 after the MLP


def _expected(rank: int) -> list[torch.Tensor]:
    """The same three masks drawn directly from the stream the spec gives this rank."""
    gen_state = torch.get_rng_state()
    torch.manual_seed(SEED + 2718 + 0 + 1 * rank)  # tp_rank 0, tp_size 1
    ones = torch.ones(BATCH, SEQ // SP, HIDDEN)
    masks = [F.dropout(ones, P) != 0 for _ in range(3)]
    torch.set_rng_state(gen_state)
    return masks


def _worker(rank: int, port: int, out_dir: str) -> None:
    become_rank(rank, SP, port)
    import deepspeed  # noqa: PLC0415

    from megatron.checkpoint import checkpointing as ck  # noqa: PLC0415
    from megatron.core import sequence_parallel as ulysses  # noqa: PLC0415
    from megatron.model import GPTModel  # noqa: PLC0415

    from megatron.deepspeed_compat import skip_shm_inference_op  # noqa: PLC0415

    skip_shm_inference_op()  # as the trainer: no C++ all-reduce op compiled in a fresh environment
    dist.init_process_group("gloo", rank=rank, world_size=SP)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    ps.initialize_model_parallel(1, 1, SP)
    out = {}
    try:
        tp.model_parallel_manual_seed(SEED)
        model = GPTModel(parallel_test_config(hidden_dropout=P))
        model.train()
        tok = ulysses.shard(torch.randint(1, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(3)))
        out["masks"] = _masks(model, tok)
        out["expected"] = _expected(rank)
        # attention dropout (heads/SP heads of the whole sequence after the all-to-all): this rank's stream
        attn = GPTModel(parallel_test_config(attention_dropout=P)).language_model.encoder.layers[0].self_attention
        attn.train()
        q, k, v = (torch.randn(BATCH, 2, SEQ, 16, generator=torch.Generator().manual_seed(9 + i)) for i in range(3))
        tp.model_parallel_manual_seed(SEED)
        out["attention"] = attn.core_attention(q, k, v)
        torch.manual_seed(SEED + 2718 + rank)
        out["attention_expected"] = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=P, enable_gqa=True)
        # checkpoint: the SP group's one model file (written by one rank) gives each rank its own stream back
        state = [ck._rng_state()]
        dist.broadcast_object_list(state, src=0, group=ps.get_sequence_parallel_group())
        out["after_save"] = _masks(model, tok)
        tp.model_parallel_manual_seed(SEED + 1)  # a fresh process would start elsewhere
        ck._set_rng_state(state[0])
        out["after_load"] = _masks(model, tok)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from distributed import spawn_workers

    return spawn_workers(_worker, SP, str(tmp_path_factory.mktemp("sp-rng")))


@pytest.mark.slow  # 2 spawned ranks (one fixture for all)
def test_sp_ranks_draw_different_masks_on_their_shards(ranks):
    for a, b in zip(ranks[0]["masks"], ranks[1]["masks"]):
        assert a.shape == (BATCH, SEQ // SP, HIDDEN)
        agree = (a == b).float().mean().item()
        # independent masks at p = 0.5 agree on half the elements (4 sigma over 2048 of them)
        assert abs(agree - 0.5) < 4 * 0.5 / (a.numel() ** 0.5), agree
    assert not torch.equal(ranks[0]["attention"], ranks[1]["attention"])


@pytest.mark.slow
def test_masks_come_from_the_spec_stream(ranks):
    for r in ranks:
        for got, want in zip(r["masks"], r["expected"]):
            assert torch.equal(got, want)
            assert abs(got.float().mean().item() - (1 - P)) < 4 * 0.5 / (got.numel() ** 0.5)
        torch.testing.assert_close(r["attention"], r["attention_expected"], rtol=0, atol=0)


@pytest.mark.slow
def test_checkpoint_restores_each_sp_ranks_stream(ranks):
    for r in ranks:
        for got, want in zip(r["after_load"], r["after_save"]):
            assert torch.equal(got, want)
    assert not torch.equal(ranks[0]["after_load"][0], ranks[1]["after_load"][0])


def test_seed_is_megatrons_at_sp1():
    from megatron.core.tensor_parallel.random import model_parallel_seed  # noqa: PLC0415

    assert ps.get_sequence_parallel_world_size() == 1 and ps.get_tensor_model_parallel_world_size() == 1
    assert model_parallel_seed(SEED) == SEED + 2718
