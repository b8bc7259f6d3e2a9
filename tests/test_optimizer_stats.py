"""megatron/observability/optimizer_stats.py: statistics equal norms computed directly from torch.optim state."""
from __future__ import annotations

import types

import pytest
import torch

from megatron.observability.optimizer_stats import inner_torch_optimizer, local_sums, optimizer_state_stats


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


def test_local_sums_read_the_host_once(host_reads):
    """One host read for all tensors and statistics (the old loop made three per tensor and statistic, each
    waiting for a GPU/XPU), with the bits of the float sums and max on the host, tensor after tensor."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (5, 7, 11, 3)]
    opt = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    want: dict[str, list[float]] = {}
    for p in params:
        st = opt.state[p]
        for name, t in (("weight", p.data), ("momentum", st["exp_avg"]), ("variance", st["exp_avg_sq"]),
                        ("variance_sqrt", st["exp_avg_sq"].clamp(min=0).sqrt())):
            s = want.setdefault(name, [0.0, 0.0, 0.0])
            s[0] += float(torch.sum(t * t))
            s[1] += float(torch.sum(t.abs()))
            s[2] = max(s[2], float(t.abs().max()))
    host_reads.clear()
    got, numel = local_sums(opt)
    assert host_reads == ["tolist"]
    assert got == want and numel == 26
