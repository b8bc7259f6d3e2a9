"""megatron/model/attention_cpu.py: the explicit bf16 CPU attention and its routing in Attention.core_attention.

Reference: `F.scaled_dot_product_attention` in float64 on the same bf16 inputs (upcast), for outputs and
q/k/v gradients. Tolerance: bf16 keeps 8 significant bits, so one rounding moves a value by up to
2^-9 of its size; the forward rounds q·k, the probabilities and the output, the backward as many
again (dP, dS, each matmul), and the bf16 scores (up to ~10 here) carry an absolute error of ~2^-9 x 10
into the exponent, so errors of a few 2^-8 are expected: max error <= 2^-5 of the reference's largest
entry and mean error <= 2^-6 of the mean magnitude (measured: <= 0.007 and <= 0.0055 of them; the fused
bf16 kernel: <= 0.010 and <= 0.004). A wrong mask, head mapping or scale gives errors of order 1 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.model import GPTConfig, GPTModel, attention_cpu
from megatron.model.gpt import Attention

BF16 = torch.bfloat16


def _inputs(b: int, h: int, h_kv: int, s: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(b, h, s, d, generator=gen)).to(BF16)  # x2: peaked, non-trivial softmax
    k, v = (torch.randn(b, h_kv, s, d, generator=gen).to(BF16) for _ in range(2))
    grad_out = torch.randn(b, h, s, d, generator=gen).to(BF16)
    return q, k, v, grad_out


def _run(fn, q, k, v, grad_out, dtype):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = fn(qq, kk, vv)
    out.backward(grad_out.to(dtype))
    return [out.detach().double(), qq.grad.double(), kk.grad.double(), vv.grad.double()]


def _document_mask(b: int, s: int) -> torch.Tensor:
    """bool [b, 1, s, s]: causal within each document (documents at different offsets per sample)."""
    docs = torch.zeros(b, s, dtype=torch.long)
    for i in range(b):
        for start in (s // 3 + 5 * i, 2 * s // 3 + 3 * i):
            docs[i, start:] += 1
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return (docs[:, None, :, None] == docs[:, None, None, :]) & causal


CASES = {  # name: (b, heads, kv heads, s, d, mask?, scale)
    "causal": (2, 4, 4, 64, 32, False, None),
    "document_mask": (2, 4, 4, 64, 32, True, None),
    "gqa": (2, 8, 2, 64, 32, False, None),
    "gqa_document_mask": (2, 8, 2, 64, 32, True, None),
    "custom_scale": (2, 4, 4, 64, 32, False, 4.0 / 32),  # MuP-style alpha/d instead of 1/sqrt(d)
}


@pytest.mark.parametrize("name", CASES)
def test_matches_sdpa_float64(name):
    b, h, h_kv, s, d, with_mask, scale = CASES[name]
    q, k, v, grad_out = _inputs(b, h, h_kv, s, d)
    mask = _document_mask(b, s) if with_mask else None
    assert attention_cpu.use_explicit(q, k)

    def ref_fn(qq, kk, vv):
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None,
                                              enable_gqa=h != h_kv, scale=scale)

    ref = _run(ref_fn, q, k, v, grad_out, torch.float64)
    got = _run(lambda qq, kk, vv: attention_cpu.attention(qq, kk, vv, mask, scale=scale), q, k, v, grad_out, BF16)
    for what, r, g in zip(("out", "dq", "dk", "dv"), ref, got):
        err = (g - r).abs()
        assert err.max().item() <= 2**-5 * r.abs().max().item(), (name, what, err.max().item())
        assert err.mean().item() <= 2**-6 * r.abs().mean().item(), (name, what, err.mean().item())


def test_bf16_softmax_rounds_once_from_float32():
    """The kernel's premise: torch's CPU softmax of bf16 scores computes in float32 and rounds once,
    so it equals softmax(dtype=float32).to(bf16) bit for bit (masked entries included)."""
    x = (4 * torch.randn(8, 32, 96, generator=torch.Generator().manual_seed(5))).to(BF16)
    x[..., 60:] = torch.finfo(BF16).min
    assert torch.equal(torch.softmax(x, -1), torch.softmax(x, -1, dtype=torch.float32).to(BF16))


def test_wrong_semantics_would_be_caught():
    """The tolerance separates: a kv-head mapping of i % kv_heads instead of i // group fails it."""
    b, h, h_kv, s, d = 1, 4, 2, 32, 16
    q, k, v, _ = _inputs(b, h, h_kv, s, d)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True)
    got = attention_cpu.attention(q, k, v).double()
    wrong = attention_cpu.attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)).double()  # head i -> i % 2
    bound = 2**-5 * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= bound < (wrong - ref).abs().max().item()


def test_row_with_nothing_to_attend_gives_zeros_like_sdpa():
    q, k, v, _ = _inputs(1, 2, 2, 8, 16)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    mask[0, 0, 3] = False
    out = attention_cpu.attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert (out[:, :, 3] == 0).all()
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert (out.double() - ref).abs().max().item() <= 2**-5 * ref.abs().max().item()


def test_dropout_drops_probabilities_with_rate_p():
    """With v = identity (s = d) the output rows are the probability rows themselves, so the kept
    probabilities must equal the undropped ones / (1 - p) exactly (x2 is exact in bf16) and the
    dropped fraction of the nonzero (causal) entries must be ~p."""
    b, h, s, p = 2, 4, 64, 0.5
    q, k, _, _ = _inputs(b, h, h, s, s)
    v = torch.eye(s, dtype=BF16).expand(b, h, s, s)
    probs = attention_cpu.attention(q, k, v)
    torch.manual_seed(7)
    dropped = attention_cpu.attention(q, k, v, dropout=p)
    torch.manual_seed(7)
    assert torch.equal(attention_cpu.attention(q, k, v, dropout=p), dropped)  # the default generator decides
    allowed = torch.ones(s, s, dtype=torch.bool).tril().expand_as(probs) & (probs > 0)
    assert not torch.equal(dropped, probs)
    kept = dropped != 0
    assert (kept & ~allowed).sum() == 0  # nothing appears where the causal mask forbids
    assert torch.equal(dropped[kept], probs[kept] / (1 - p))
    frac = 1 - kept[allowed].float().mean().item()  # n ~ 16k entries: std of the fraction ~0.004
    assert abs(frac - p) < 0.03


# ---------------------------------------------------------------- routing in Attention.core_attention


def _attention_module(heads: int = 4, kv_heads: int = 2, dropout: float = 0.0) -> Attention:
    cfg = GPTConfig(vocab_size=64, hidden_size=64, num_layers=1, num_attention_heads=heads,
                    num_key_value_heads=kv_heads, attention_dropout=dropout, max_position_embeddings=64)
    return Attention(cfg).eval()


def test_use_explicit_conditions(monkeypatch):
    q, k, _, _ = _inputs(2, 4, 2, 16, 8)
    assert attention_cpu.use_explicit(q, k)
    assert not attention_cpu.use_explicit(q.float(), k.float())  # float32: the fused kernel is faster
    assert not attention_cpu.use_explicit(q.half(), k.half())
    meta = torch.empty(2, 4, 16, 8, dtype=BF16, device="meta")  # any non-CPU device keeps sdpa
    assert not attention_cpu.use_explicit(meta, meta)
    monkeypatch.setattr(attention_cpu, "MAX_SCORE_ELEMENTS", 2 * 4 * 16 * 16)  # b*heads*s_q*s_k
    assert attention_cpu.use_explicit(q, k)
    monkeypatch.setattr(attention_cpu, "MAX_SCORE_ELEMENTS", 2 * 4 * 16 * 16 - 1)
    assert not attention_cpu.use_explicit(q, k)


@pytest.mark.parametrize("with_mask", [False, True])
def test_core_attention_routes(monkeypatch, with_mask):
    attn = _attention_module()
    q, k, v, _ = _inputs(2, 4, 2, 16, 16)
    mask = _document_mask(2, 16) if with_mask else None

    def sdpa(qq, kk, vv):
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None, enable_gqa=True)

    # bf16 on CPU within the cap: the explicit kernel
    assert torch.equal(attn.core_attention(q, k, v, mask), attention_cpu.attention(q, k, v, mask))
    # float32: sdpa, bitwise
    qf, kf, vf = q.float(), k.float(), v.float()
    assert torch.equal(attn.core_attention(qf, kf, vf, mask), sdpa(qf, kf, vf))
    # bf16 above the cap: sdpa, bitwise
    monkeypatch.setattr(attention_cpu, "MAX_SCORE_ELEMENTS", 2 * 4 * 16 * 16 - 1)
    assert torch.equal(attn.core_attention(q, k, v, mask), sdpa(q, k, v))


def test_core_attention_dropout_only_in_training():
    attn = _attention_module(dropout=0.3)
    q, k, v, _ = _inputs(2, 4, 2, 16, 16)
    assert torch.equal(attn.core_attention(q, k, v), attention_cpu.attention(q, k, v))  # eval: no dropout
    attn.train()
    torch.manual_seed(3)
    out = attn.core_attention(q, k, v)
    torch.manual_seed(3)
    assert torch.equal(out, attention_cpu.attention(q, k, v, dropout=0.3))
    assert not torch.equal(out, attention_cpu.attention(q, k, v))


def test_causal_bias_is_cached():
    q, k, v, _ = _inputs(1, 2, 2, 24, 8)
    attention_cpu._causal_bias.cache_clear()
    attention_cpu.attention(q, k, v)
    attention_cpu.attention(q, k, v)
    info = attention_cpu._causal_bias.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    bias = attention_cpu._causal_bias(24, 24, q.device, BF16)
    assert bias.dtype == BF16 and not bias.requires_grad
    assert torch.equal(bias == 0, torch.ones(24, 24, dtype=torch.bool).tril())


# ---------------------------------------------------------------- whole model


def test_bf16_model_loss_and_grads_match_sdpa_path(monkeypatch):
    """GPTModel in bf16: the explicit path against the same model on sdpa (cap 0) and both against
    the float32 model: the explicit path is as close to float32 as the fused kernel is."""
    cfg = GPTConfig(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    ffn_hidden_size=128, max_position_embeddings=64, init_method_std=0.05)
    torch.manual_seed(0)
    model32 = GPTModel(cfg)
    tok = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tok, -1, dims=1)
    model = GPTModel(cfg)
    model.load_state_dict(model32.state_dict())
    model = model.to(BF16)

    def loss_and_grad(m):
        m.zero_grad()
        loss = m(tok, labels=labels).float().mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.float().flatten() for p in m.parameters()])

    ref_loss, ref_grad = loss_and_grad(model32)
    explicit_loss, explicit_grad = loss_and_grad(model)
    monkeypatch.setattr(attention_cpu, "MAX_SCORE_ELEMENTS", 0)
    sdpa_loss, sdpa_grad = loss_and_grad(model)
    assert ref_loss > 4.0  # ~log(128): a real loss
    assert abs(explicit_loss - sdpa_loss) < 5e-3 and abs(explicit_loss - ref_loss) < 5e-3  # measured ~6e-4
    gnorm = ref_grad.norm().item()
    err_explicit, err_sdpa = (explicit_grad - ref_grad).norm().item(), (sdpa_grad - ref_grad).norm().item()
    assert not torch.equal(explicit_grad, sdpa_grad)  # the cap really switched the kernel
    assert err_explicit < 0.03 * gnorm and err_sdpa < 0.03 * gnorm  # measured ~0.0075 both
    assert err_explicit < 2 * err_sdpa + 0.005 * gnorm


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_bf16_recompute_with_dropout_is_bit_identical(recompute):
    """Activation checkpointing around the explicit path redraws the same attention-dropout mask."""
    cfg = {"vocab_size": 128, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "ffn_hidden_size": 128, "max_position_embeddings": 64, "attention_dropout": 0.2}
    tok = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tok, -1, dims=1)
    results = []
    for granularity in (None, recompute):
        torch.manual_seed(0)
        model = GPTModel(GPTConfig(**cfg, recompute_granularity=granularity)).to(BF16).train()
        torch.manual_seed(5)
        loss = model(tok, labels=labels).float().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    with torch.no_grad():  # the dropout was really active
        assert not torch.equal(model.eval()(tok, labels=labels).float().mean(), loss0)
