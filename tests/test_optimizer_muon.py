"""Muon: parity with torch.optim.Muon, the registry entry at every stage and precision, MuonClip's
QK-clip. Under ZeRO, the same Muon on 2 gloo ranks is held to the single-process run by
tests/test_optimizer_matrix.py."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.config import Config, default_args  # noqa: E402
from megatron.model import GPTConfig, GPTModel  # noqa: E402
from megatron.optimizer import build_optimizer  # noqa: E402
from megatron.optimizer.muon import (  # noqa: E402
    Muon,
    QKClip,
    is_muon_param,
    max_logits,
    newton_schulz,
    rms_scale,
)

LR, WD, STEPS = 2e-3, 0.0, 10


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(**kw) -> Config:
    base = dict(optimizer="muon", lr=LR, weight_decay=WD, zero_stage=0, bf16=False, clip_grad=0.0,
                muon_momentum=0.95, muon_nesterov=True, muon_ns_steps=5, muonadamw_beta1=0.9,
                muonadamw_beta2=0.999, muonadamw_eps=1e-8, muonclip_t=100.0, muonclip_alpha=0.5,
                adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8)
    base.update(kw)
    return Config.from_args(default_args(**base))


def tiny_model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    ffn_hidden_size=48, max_position_embeddings=16, normalization="rmsnorm", swiglu=True,
                    use_rotary_position_embeddings=True, untie_embeddings_and_output_weights=True,
                    add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(cfg)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 17), generator=g) for _ in range(n)]


def loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens[:, :-1], labels=tokens[:, 1:]).mean()


# ----------------------------------------------------------------------------- no ZeRO
def test_newton_schulz_orthogonalizes():
    g = torch.randn(24, 40)
    s = torch.linalg.svdvals(newton_schulz(g, 5).float())
    assert s.min() > 0.6 and s.max() < 1.25


def test_routing_rule():
    model = tiny_model()
    muon = {n for n, p in model.named_parameters() if is_muon_param(n, p)}
    assert "language_model.encoder.layers.0.self_attention.query_key_value.weight" in muon
    assert "language_model.encoder.layers.1.mlp.dense_4h_to_h.weight" in muon
    assert not any("embeddings" in n or "output_layer" in n or "norm" in n for n in muon)


def test_parity_with_torch_muon_match_rms_adamw():
    """20 steps on 2-D hidden weights: max |diff| <= 1e-6 vs torch.optim.Muon(adjust_lr_fn="match_rms_adamw")."""
    torch.manual_seed(0)
    shapes = [(32, 16), (16, 48), (24, 24)]
    ours = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = Muon([{"params": ours, "muon": True}], lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True,
             ns_steps=5)
    b = torch.optim.Muon(ref, lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True, ns_steps=5,
                         adjust_lr_fn="match_rms_adamw")
    for step in range(20):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 7 + p.numel()))
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, ref):
        assert (p - q).abs().max().item() <= 1e-6


def test_aux_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    q = torch.nn.Parameter(p.detach().clone())
    a = Muon([{"params": [p], "muon": False}], lr=0.01, weight_decay=0.1, adamw_betas=(0.9, 0.95),
             adamw_eps=1e-8)
    b = torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(20):
        g = torch.randn(10, generator=torch.Generator().manual_seed(step))
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert (p - q).abs().max().item() <= 1e-6


def test_every_stage_and_precision_builds_our_muon_with_one_muon_group():
    """One Muon for every ZeRO stage and precision (under ZeRO it orthogonalizes whole matrices
    gathered from the partitions: tests/test_optimizer_matrix.py holds it to the single-process
    run); Newton-Schulz in bf16 for bf16/fp16 runs, fp32 for fp32 runs."""
    for zero in (0, 1, 2, 3):
        for bf16 in (False, True):
            model = tiny_model()
            opt = build_optimizer(model, make_config(zero_stage=zero, bf16=bf16))
            assert type(opt) is Muon and opt.ns_dtype == (torch.bfloat16 if bf16 else torch.float32)
            assert [(g["name"], g["muon"]) for g in opt.param_groups] == [
                ("muon", True), ("adamw_decay", False), ("adamw_no_decay", False)]
            qkv = model.language_model.encoder.layers[0].self_attention.query_key_value.weight
            assert any(p is qkv for p in opt.param_groups[0]["params"])
            # DeepSpeed's bf16 optimizer would run its own Muon on a group with "use_muon"
            assert all("use_muon" not in g for g in opt.param_groups)


def test_flags_and_refusals():
    from megatron.optimizer import optimizer_problems

    assert optimizer_problems(make_config(zero_stage=3)) == []
    assert optimizer_problems(make_config(zero_stage=1, muon_ns_steps=6, muon_nesterov=False)) == []
    assert optimizer_problems(make_config(optimizer="muonclip", zero_stage=1)) == []
    errs = optimizer_problems(make_config(optimizer="muonclip", zero_stage=3))
    assert errs == ["--optimizer muonclip rescales rows of the model's whole QKV weights after the step, which "
                    "ZeRO-3 keeps partitioned: use --zero-stage 1 or 2 (or --optimizer muon at ZeRO-3)"]


# ----------------------------------------------------------------------------- MuonClip
def test_muonclip_fires_and_bounds_max_logit():
    model = tiny_model()
    attn = model.language_model.encoder.layers[0].self_attention
    with torch.no_grad():  # force huge logits on head 1 (kv group 0) and head 3 (kv group 1)
        w = attn.query_key_value.weight.view(attn.n_kv, attn.group + 2, attn.d, -1)
        w[0, 1] *= 40.0
        w[0, 2] *= 10.0  # k of group 0
        w[0, 0] *= 25.0
        w[1, 1] *= 60.0
        w[1, 2] *= 10.0  # k of group 1
    clip = QKClip(t=5.0, alpha=0.5)
    tokens = batches(1)[0][:, :16]
    inputs = {}  # the attention inputs, captured here to measure the logits again after the clip
    for a in model.modules():
        if hasattr(a, "query_key_value"):
            a.register_forward_pre_hook(lambda m, inp: inputs.__setitem__(m, (inp[0].detach(), inp[1], None)))
    clip.attach(model)
    model.train()
    model(tokens)
    attns = list(inputs)
    before = {a: max_logits(a, *inputs[a]) for a in attns}
    for a in attns:  # what the forward recorded is the max logit of each head
        torch.testing.assert_close(clip.maxes[a], before[a])
    expected = sum(int((m > 5.0).sum()) for m in before.values())
    assert before[attn][1] > 5.0 and expected >= 2
    out = clip(model, lambda: [(tokens, torch.ones_like(tokens, dtype=torch.float32))])
    assert out["muonclip_heads_clipped"] == expected and out["muonclip_max_logit"] > 5.0
    assert clip.maxes == {}  # consumed: the next step starts a new max
    for a in attns:
        after = max_logits(a, *inputs[a])
        assert after.max().item() <= 5.0 * (1 + 1e-4)
        under = before[a] <= 5.0  # heads under the threshold keep their logits
        assert torch.allclose(after[under], before[a][under], rtol=1e-4)
        assert torch.allclose(after[~under], torch.full_like(after[~under], 5.0), rtol=1e-4)  # clipped land on t


def test_muonclip_reads_the_maxima_once_per_step_not_per_layer(host_reads):
    """The per-head maxima of every layer are reduced and read back together: one host read per step (each
    read stalls a GPU/XPU; the old loop made three per layer). The clip is the same: the heads over t, per
    layer, as counted from each layer's own maxima."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, hidden_size=32, num_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    ffn_hidden_size=48, max_position_embeddings=16)
    model = GPTModel(cfg)
    layers = model.language_model.encoder.layers
    with torch.no_grad():  # layers 1 and 3: head 1 far over t
        for i in (1, 3):
            w = layers[i].self_attention.query_key_value.weight.view(2, 4, 8, -1)
            w[0, 1] *= 40.0
            w[0, 2] *= 10.0
    clip = QKClip(t=5.0, alpha=0.5)
    clip.attach(model)
    model.train()
    model(batches(1)[0][:, :16])
    maxes = [clip.maxes[layer.self_attention].clone() for layer in layers]
    weights = [layer.self_attention.query_key_value.weight.clone() for layer in layers]
    host_reads.clear()
    out = clip(model, lambda: [])
    assert host_reads == ["tolist"]
    assert out["muonclip_heads_clipped"] == sum(int((m > 5.0).sum()) for m in maxes) >= 2
    assert out["muonclip_max_logit"] == max(float(m.max()) for m in maxes)
    for layer, m, w in zip(layers, maxes, weights):
        changed = not torch.equal(layer.self_attention.query_key_value.weight, w)
        assert changed == bool((m > 5.0).any())


def test_ns_steps_and_nesterov_flags_reach_the_update():
    """--muon-ns-steps and --muon-nesterov (muon_ns_steps, muon_nesterov) set the groups and change the step."""
    def two_updates(**kw):
        model = tiny_model()
        opt = build_optimizer(model, make_config(**kw))
        qkv = model.language_model.encoder.layers[0].self_attention.query_key_value.weight
        before = qkv.detach().clone()
        for tokens in batches(2):  # two steps: from zero momentum, Nesterov's first direction is the plain one
            opt.zero_grad()
            loss_of(model, tokens).backward()
            opt.step()
        return opt.param_groups[0], qkv.detach() - before

    group, base = two_updates()
    assert group["ns_steps"] == 5 and group["nesterov"] is True
    group, fewer = two_updates(muon_ns_steps=2)
    assert group["ns_steps"] == 2 and (fewer - base).abs().max() > 1e-3 * base.abs().max()
    group, plain = two_updates(muon_nesterov=False)
    assert group["nesterov"] is False and (plain - base).abs().max() > 1e-3 * base.abs().max()
