"""The fused eager kernels of the model against the plain implementation they replace.

* `megatron/model/rotary.py` (QKV split + RoPE): the plain path is `Attention.forward` with
  `apply_rotary` (itself checked against HF Llama in test_hf_convert / test_model). Same
  arithmetic, rounding for rounding, so the loss and every parameter gradient must be
  bit-identical, in float32 and bf16, for MHA, GQA, partial rotary and per-sample positions.
* `megatron/model/fused_cross_entropy.py` (output layer + loss): the plain path is the output
  matmul then `F.cross_entropy(logits.float())`. The loss is bit-identical (same log-softmax
  kernel on the same bf16 logits). Gradients: bit-identical when the per-token weight is a power of
  two (a mean over 2^k tokens); otherwise the fused path rounds G = softmax - onehot to bf16 before
  scaling by the weight instead of after, one extra bf16 rounding (relative 2^-8) on
  values of size up to max|G @ W|: asserted <= 2^-7 of the largest gradient entry.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.model import GPTConfig, GPTModel, fused_cross_entropy, rotary

BF16 = torch.bfloat16


def _loss_and_grads(model, tokens, position_ids=None, weights=None):
    model.zero_grad(set_to_none=True)
    losses = model(tokens, position_ids=position_ids, labels=tokens)
    w = torch.full(losses.shape, 1.0 / losses.numel()) if weights is None else weights
    (losses.float() * w).sum().backward()
    return [losses.detach()] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("heads,kv_heads,rotary_percent,positions",
                         [(8, 8, 1.0, False), (8, 2, 1.0, False), (4, 1, 0.5, True)])
def test_qkv_rotary_is_bit_identical_to_the_plain_path(monkeypatch, dtype, heads, kv_heads, rotary_percent,
                                                       positions):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, hidden_size=128, num_layers=2, num_attention_heads=heads,
                    num_key_value_heads=kv_heads, rotary_percent=rotary_percent, max_position_embeddings=64)
    model = GPTModel(cfg).to(dtype)
    tokens = torch.randint(0, 256, (2, 32))
    pos = torch.randint(0, 64, (2, 32)) if positions else None
    calls = []
    real = rotary.qkv_rotary
    monkeypatch.setattr(rotary, "qkv_rotary", lambda *a: calls.append(1) or real(*a))
    fused = _loss_and_grads(model, tokens, pos)
    assert len(calls) == 2  # one per layer: the fused path ran
    monkeypatch.setattr(rotary, "use_fused", lambda: False)
    plain = _loss_and_grads(model, tokens, pos)
    assert len(calls) == 2
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


def test_qkv_rotary_rotates_by_position():
    """Independent check of the rotation itself: RoPE preserves each head's norm, and q.k of two
    rotated vectors depends only on their position difference."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=16, hidden_size=32, num_layers=1, num_attention_heads=2, max_position_embeddings=16)
    emb = GPTModel(cfg).language_model.rotary_pos_emb
    d, s = 16, 16
    vec = torch.randn(d)
    qkv = torch.zeros(1, s, 2 * 3 * d)  # 2 kv groups of [q, k, v], every position holds the same vector
    qkv.view(1, s, 2, 3, d)[:] = vec
    q, k, v = rotary.qkv_rotary(qkv, 2, 1, d, *emb(s, None))
    assert torch.allclose(q.norm(dim=-1), vec.norm().expand(1, 2, s), rtol=1e-5)
    assert torch.equal(v, vec.expand(1, 2, s, d))
    dots = q[0, 0] @ k[0, 0].T  # [s, s]
    assert torch.allclose(dots.diagonal(3), dots.diagonal(3)[0].expand(s - 3), atol=1e-4)
    assert not torch.allclose(dots.diagonal(3)[0], dots.diagonal(5)[0], atol=1e-2)


def _plain_ce(x, w, labels):
    return F.cross_entropy((x @ w.T).float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)


def _ce_case(fn, x, w, labels, weights):
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(xx, ww, labels)
    (loss * weights).sum().backward()
    return loss.detach(), xx.grad, ww.grad


@pytest.mark.parametrize("chunk", [2**17, 1000])  # one chunk; many, with a partial last one
def test_fused_cross_entropy_matches_plain(monkeypatch, chunk):
    monkeypatch.setattr(fused_cross_entropy, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 32, generator=gen).to(BF16)
    w = (0.3 * torch.randn(96, 32, generator=gen)).to(BF16)
    labels = torch.randint(0, 96, (2, 64), generator=gen)
    mean = torch.full(labels.shape, 1 / 128)  # a mean over 2^7 tokens: bit-identical
    fused = _ce_case(fused_cross_entropy.output_cross_entropy, x, w, labels, mean)
    plain = _ce_case(_plain_ce, x, w, labels, mean)
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert fused[0].dtype == torch.float32

    labels[0, :5] = -100  # ignored tokens: loss 0, no gradient; uneven weights (a loss mask / 121)
    weights = torch.rand(labels.shape, generator=gen) / 121
    fused = _ce_case(fused_cross_entropy.output_cross_entropy, x, w, labels, weights)
    plain = _ce_case(_plain_ce, x, w, labels, weights)
    assert torch.equal(fused[0], plain[0]) and torch.all(fused[0][0, :5] == 0)
    for a, b in zip(fused[1:], plain[1:]):
        assert (a.float() - b.float()).abs().max() <= 2**-7 * b.float().abs().max()
    assert torch.all(fused[1][0, :5] == 0)  # ignored tokens' hidden states get no gradient


@pytest.mark.parametrize("tied", [False, True])
def test_model_uses_fused_loss_in_bf16_only(monkeypatch, tied):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=128, hidden_size=64, num_layers=1, num_attention_heads=4,
                    max_position_embeddings=32, untie_embeddings_and_output_weights=not tied)
    calls = []
    real = fused_cross_entropy.output_cross_entropy
    monkeypatch.setattr(fused_cross_entropy, "output_cross_entropy", lambda *a: calls.append(1) or real(*a))
    tokens = torch.randint(0, 128, (2, 32))
    _loss_and_grads(GPTModel(cfg), tokens)
    assert calls == []  # float32: the plain path
    model = GPTModel(cfg).to(BF16)
    fused = _loss_and_grads(model, tokens)  # 64 tokens: a power-of-two mean
    assert calls == [1]
    monkeypatch.setattr(fused_cross_entropy, "use_fused", lambda x: False)
    plain = _loss_and_grads(model, tokens)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)
