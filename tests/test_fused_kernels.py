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
* `megatron/model/fused_norm.py` (RMSNorm): the plain path is `RMSNorm.forward` with
  `fused_norm.use_fused` off. Same expressions, rounding for rounding: output and both gradients
  bit-identical for the module alone in float32 and bf16 (also a float32 weight on a bf16 input). In
  a whole float32 model the gradient reaching a norm's input is the sum of three float32 terms (the
  residual, the normalized path, the rstd path); the plain autograd adds them in the order the engine
  meets them, the fused backward adds the last two first: the parameter gradients then differ by float32
  reassociation only, asserted <= 1e-5 of the largest entry; in bf16 the plain path sums the two
  terms in float32 first as well, so the bf16 model is bit-identical.
* `megatron/model/fused_swiglu.py` (SwiGLU): the plain path is `MLP.forward` with
  `fused_swiglu.use_fused` off. The same operations (silu, the product, silu's backward, the two
  products of the backward), only written into one gradient buffer instead of concatenated: output,
  input gradient and the model's loss and gradients bit-identical in float32 and bf16.
* `megatron/model/attention_cpu.py` causal query blocks: against the one-block path (the previous
  code) and float64 sdpa on the same inputs. The forward is the same per-row arithmetic on a shorter row
  (the skipped scores are exact zeros after the softmax); k and v gradients are summed block by block
  in bf16 (one rounding per block): asserted within 2^-7 of the largest entry of the one-block path.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.model import GPTConfig, GPTModel, attention_cpu, fused_cross_entropy, fused_norm, fused_swiglu, rotary
from megatron.model.gpt import MLP, RMSNorm

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


def _module_case(fn, x, params, grad):
    xx = x.clone().requires_grad_()
    for p in params:
        p.grad = None
    out = fn(xx)
    out.backward(grad)
    return [out.detach(), xx.grad] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (BF16, BF16), (BF16, torch.float32)])
def test_rms_norm_is_bit_identical_to_the_module(monkeypatch, dtype, weight_dtype):
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-5).to(weight_dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(96, generator=gen))
    x = (3 * torch.randn(2, 40, 96, generator=gen)).to(dtype)
    grad = torch.randn(2, 40, 96, generator=gen).to(torch.promote_types(dtype, weight_dtype))
    calls = []
    real = fused_norm.rms_norm
    monkeypatch.setattr(fused_norm, "rms_norm", lambda *a: calls.append(1) or real(*a))
    fused = _module_case(norm, x, [norm.weight], grad)
    assert calls == [1]
    monkeypatch.setattr(fused_norm, "use_fused", lambda: False)
    plain = _module_case(norm, x, [norm.weight], grad)
    assert calls == [1]
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # independent check of the value: float64 RMSNorm of the same input, then the module's roundings
    x64 = x.double()
    ref = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype).double() * norm.weight.double()
    assert torch.allclose(fused[0].double(), ref, rtol=2**-7 if dtype == BF16 else 1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_model_with_fused_norm_matches_the_plain_model(monkeypatch, dtype):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, hidden_size=128, num_layers=2, num_attention_heads=4, max_position_embeddings=64)
    model = GPTModel(cfg).to(dtype)
    with torch.no_grad():  # norms with non-trivial weights
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.2 * torch.randn_like(p))
    tokens = torch.randint(0, 256, (2, 32))
    fused = _loss_and_grads(model, tokens)
    monkeypatch.setattr(fused_norm, "use_fused", lambda: False)
    plain = _loss_and_grads(model, tokens)
    assert torch.equal(fused[0], plain[0])
    for a, b in zip(fused[1:], plain[1:]):
        if dtype == BF16:
            assert torch.equal(a, b)
        else:  # float32 reassociation of the norm input's gradient (module docstring)
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_swiglu_is_bit_identical_to_the_plain_code(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(0)
    mlp = MLP(GPTConfig(vocab_size=64, hidden_size=48, num_layers=1, num_attention_heads=4,
                        ffn_hidden_size=72)).to(dtype)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    x = (2 * torch.randn(3, 17, 48, generator=gen)).to(dtype)
    grad = torch.randn(3, 17, 48, generator=gen).to(dtype)
    calls = []
    real = fused_swiglu.swiglu
    monkeypatch.setattr(fused_swiglu, "swiglu", lambda t: calls.append(t.shape) or real(t))
    fused = _module_case(mlp, x, list(mlp.parameters()), grad)
    assert calls == [torch.Size([3, 17, 144])]
    monkeypatch.setattr(fused_swiglu, "use_fused", lambda: False)
    plain = _module_case(mlp, x, list(mlp.parameters()), grad)
    assert len(calls) == 1
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
    # independent check of the function itself: float64 silu(gate) * up and its gradient
    h = (2 * torch.randn(5, 2 * 40, generator=gen)).to(dtype).requires_grad_()
    g = torch.randn(5, 40, generator=gen).to(dtype)
    out = fused_swiglu.swiglu(h)
    out.backward(g)
    h64 = h.detach().double().requires_grad_()
    ref = F.silu(h64[:, :40]) * h64[:, 40:]
    ref.backward(g.double())
    tol = 2**-6 if dtype == BF16 else 1e-6
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    assert (h.grad.double() - h64.grad).abs().max() <= tol * h64.grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_model_with_fused_swiglu_matches_the_plain_model(monkeypatch, dtype):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, hidden_size=128, num_layers=2, num_attention_heads=4, max_position_embeddings=64)
    model = GPTModel(cfg).to(dtype)
    tokens = torch.randint(0, 256, (2, 32))
    calls = []
    real = fused_swiglu.swiglu
    monkeypatch.setattr(fused_swiglu, "swiglu", lambda t: calls.append(1) or real(t))
    fused = _loss_and_grads(model, tokens)
    assert len(calls) == 2  # one per layer
    monkeypatch.setattr(fused_swiglu, "use_fused", lambda: False)
    plain = _loss_and_grads(model, tokens)
    assert len(calls) == 2
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


def test_causal_blocks_rule(monkeypatch):
    monkeypatch.setattr(attention_cpu, "CAUSAL_BLOCKS", 4)
    monkeypatch.setattr(attention_cpu, "MIN_BLOCK_ROWS", 128)
    assert attention_cpu.causal_blocks(512, 512) == 4
    assert attention_cpu.causal_blocks(384, 384) == 3  # 4 blocks of 96 rows would be under the minimum
    assert attention_cpu.causal_blocks(300, 300) == 2
    assert attention_cpu.causal_blocks(200, 200) == 1
    assert attention_cpu.causal_blocks(512, 1024) == 1  # only square (self-attention) scores
    monkeypatch.setattr(attention_cpu, "CAUSAL_BLOCKS", 1)
    assert attention_cpu.causal_blocks(512, 512) == 1


@pytest.mark.parametrize("heads,kv_heads,s", [(4, 4, 64), (8, 2, 48)])
def test_block_causal_attention_matches_one_block_and_sdpa(monkeypatch, heads, kv_heads, s):
    gen = torch.Generator().manual_seed(0)
    q = (2 * torch.randn(2, heads, s, 32, generator=gen)).to(BF16)
    k, v, grad_out = (torch.randn(2, n, s, 32, generator=gen).to(BF16) for n in (kv_heads, kv_heads, heads))

    def run(fn, dtype=BF16):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        out.backward(grad_out.to(dtype))
        return [out.detach().double(), qq.grad.double(), kk.grad.double(), vv.grad.double()]

    monkeypatch.setattr(attention_cpu, "MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(attention_cpu, "CAUSAL_BLOCKS", 4)
    applied = []
    real = attention_cpu._BlockCausal.apply
    monkeypatch.setattr(attention_cpu._BlockCausal, "apply", lambda *a: applied.append(a[3]) or real(*a))
    blocks = run(attention_cpu.attention)
    assert applied == [4]
    monkeypatch.setattr(attention_cpu, "CAUSAL_BLOCKS", 1)
    one = run(attention_cpu.attention)
    assert applied == [4]
    ref = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True), torch.float64)
    for got, base, exact in zip(blocks, one, ref):
        assert (got - base).abs().max() <= 2**-7 * base.abs().max()
        # as close to float64 as the one-block path (test_attention_cpu's bound: 2^-5 of the largest entry)
        assert (got - exact).abs().max() <= 2**-5 * exact.abs().max()
