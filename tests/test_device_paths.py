"""The per-step code runs on a device that is not the CPU, with no host read inside it.

Everything here is tested on a CPU, where a tensor made without `device=` lands on the right device by
luck and a host read (`float()`, `.item()`, `bool()` of a tensor) costs nothing. On a GPU/XPU the first
mixes a CPU and a device tensor (an error for all but 0-d CPU tensors) and the second stalls the device.
Here the model and the optimizers run on `meta` tensors, a device whose values no host code can read and
which no op mixes with CPU tensors: the model's forward and backward in each of its variants (dropout,
learned positions, full and selective recompute, per-document masks and positions, LayerNorm/GELU/bias)
and one step of every optimizer written in megatron/optimizer. (The audit found these clean; the
test keeps them so.) Last, the attention's choice of SDPA kernel for grouped K/V on a faked CUDA/XPU device.
"""
from __future__ import annotations

import pytest
import torch

from megatron.data.gpt_dataset import document_attention_mask, reset_position_ids
from megatron.model import GPTConfig, GPTModel
from megatron.optimizer.ademamix import AdEMAMix
from megatron.optimizer.adopt import ADOPT
from megatron.optimizer.galore import GaLoreAdamW, galore_groups
from megatron.optimizer.lamb import LAMB
from megatron.optimizer.lion import Lion
from megatron.optimizer.muon import Muon
from megatron.optimizer.sophia import SophiaG
from megatron.training import get_batch

META = torch.device("meta")


@pytest.mark.parametrize("variant", [
    {},
    {"use_rotary_position_embeddings": False},
    {"recompute_granularity": "full"},
    {"recompute_granularity": "selective"},
    {"swiglu": False, "normalization": "layernorm", "add_bias_linear": True},
])
def test_forward_and_backward_stay_on_the_device(variant):
    cfg = GPTConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    ffn_hidden_size=48, max_position_embeddings=16, hidden_dropout=0.1, attention_dropout=0.1,
                    **variant)
    with META:
        model = GPTModel(cfg)
    model.train()
    batch = {"text": torch.zeros(2, 17, dtype=torch.long)}  # the loader's CPU batch
    tokens, labels, mask = get_batch(batch, type("Data", (), {"eod_mask_loss": True}), 3, META)
    assert {tokens.device, labels.device, mask.device} == {META}
    for extra in ({}, {"position_ids": reset_position_ids(tokens, 3), "attention_mask": document_attention_mask(tokens, 3)}):
        loss = (model(tokens, labels=labels, **extra) * mask).sum()
        loss.backward()
        assert loss.device == META
    assert all(p.grad.device == META for p in model.parameters())


def _params():
    params = [torch.nn.Parameter(torch.empty(8, 4, device=META)), torch.nn.Parameter(torch.empty(4, device=META))]
    for p in params:
        p.grad = torch.empty_like(p)
    return params


@pytest.mark.parametrize("build", [
    lambda: LAMB(_params()),
    lambda: LAMB(_params(), weight_norm_clamp=10.0, ratio_clamp=(0.01, 10.0)),
    lambda: Lion(_params()),
    lambda: ADOPT(_params()),
    lambda: AdEMAMix(_params()),
    lambda: SophiaG(_params()),
    lambda: GaLoreAdamW(galore_groups([{"params": _params()}])),
    lambda: Muon([{"params": [p], "muon": p.ndim == 2} for p in _params()]),
], ids=["lamb", "lamb-clamped", "lion", "adopt", "ademamix", "sophiag", "galore", "muon"])
def test_every_optimizer_steps_on_the_device(build):
    """Two steps (ADOPT's first one only fills its second moment), each on the device throughout."""
    opt = build()
    opt.step()
    opt.step()
    for group in opt.param_groups:
        for p in group["params"]:
            assert all(v.device == META for k, v in opt.state[p].items() if torch.is_tensor(v) and k != "step")


def _on(kind: str, t: torch.Tensor) -> torch.Tensor:
    """`t` (a CPU tensor) reporting `kind` as its device: the attention's kernel choice reads only that."""
    fake = type(f"On{kind}", (torch.Tensor,), {"device": property(lambda self: torch.device(kind, 0))})
    return torch.Tensor._make_subclass(fake, t)


@pytest.mark.parametrize("kind, dtype, masked, version, fused", [
    ("cuda", torch.bfloat16, False, None, True),    # flash takes grouped K/V
    ("cuda", torch.float32, False, None, False),    # fp32: no flash, math would run
    ("cuda", torch.bfloat16, True, None, False),    # --reset-attention-mask: no flash, math would run
    ("xpu", torch.bfloat16, True, "2.8.0+xpu", True),
    ("xpu", torch.bfloat16, False, "2.5.1+cxx11.abi", False),
    ("cpu", torch.float32, True, None, True),       # the CPU as it was
    ("cuda", torch.bfloat16, False, "2.3.1", False),  # no enable_gqa before torch 2.5: expanded, not passed
    ("cpu", torch.float32, False, "2.4.0+cpu", False),
])
def test_grouped_query_attention_reaches_a_fused_kernel(monkeypatch, kind, dtype, masked, version, fused):
    """With grouped K/V (4 query heads, 2 KV heads) the attention hands SDPA `enable_gqa=True` only where a
    fused kernel takes it; elsewhere (torch would fall back to its math kernel, the [b, heads, s, s] scores
    in memory) K/V are expanded to every query head first, head i getting KV head i // 2. The output is
    SDPA's with enable_gqa=True either way (checked on the CPU, the device only faked)."""
    if version is not None:
        monkeypatch.setattr(torch, "__version__", version)
    cfg = GPTConfig(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=4, num_key_value_heads=2,
                    ffn_hidden_size=48, max_position_embeddings=16)
    attn = GPTModel(cfg).language_model.encoder.layers[0].self_attention.eval()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, 8, generator=g) for n in (4, 2, 2))
    mask = torch.ones(8, 8, dtype=torch.bool).tril().expand(2, 1, 8, 8) if masked else None
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        calls.append((k.shape[1], kw.get("enable_gqa")))  # absent (None) when K/V were expanded
        return sdpa(*(t.as_subclass(torch.Tensor) for t in (q, k, v)), **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    out = attn.core_attention(*(_on(kind, t.to(dtype)) for t in (q, k, v)), mask)
    assert calls == ([(2, True)] if fused else [(4, None)])
    want = sdpa(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), want, rtol=0, atol=0)
