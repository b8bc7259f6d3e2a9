"""megatron/observability/optimizer_stats.py: statistics equal norms computed directly from torch.optim state."""
from __future__ import annotations

import types

import pytest
import torch

from megatron.observability.optimizer_stats import inner_torch_optimizer, optimizer_state_stats


def trained(opt_cls, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = opt_cls(model.parameters(), **kw)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
    return model, opt


def cat(tensors):
    return torch.cat([t.detach().flatten().double() for t in tensors])


def test_adamw_statistics_equal_direct_norms():
    model, opt = trained(torch.optim.AdamW, lr=1e-2)
    params = list(model.parameters())
    m = cat(opt.state[p]["exp_avg"] for p in params)
    v = cat(opt.state[p]["exp_avg_sq"] for p in params)
    w = cat(params)
    wrapper = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=opt))  # ZeRO-like nesting
    assert inner_torch_optimizer(wrapper) is opt
    got = optimizer_state_stats(wrapper, model_numel=w.numel())
    for name, t in {"weight": w, "momentum": m, "variance": v, "variance_sqrt": v.sqrt()}.items():
        assert got[f"{name}_l2"] == pytest.approx(float(t.norm()), rel=1e-6)
        assert got[f"{name}_l1"] == pytest.approx(float(t.abs().sum()), rel=1e-6)
        assert got[f"{name}_abs_max"] == pytest.approx(float(t.abs().max()), rel=1e-6)
        assert got[f"{name}_l2"] > 0


def test_sgd_momentum_buffer_and_no_variance():
    model, opt = trained(torch.optim.SGD, lr=0.1, momentum=0.9)
    got = optimizer_state_stats(opt)
    m = cat(opt.state[p]["momentum_buffer"] for p in model.parameters())
    assert got["momentum_l2"] == pytest.approx(float(m.norm()), rel=1e-6)
    assert not any(k.startswith("variance") for k in got)


def test_no_torch_optimizer_is_an_error():
    with pytest.raises(TypeError, match="no torch optimizer"):
        inner_torch_optimizer(object())
