"""Counters of our optimizers kept in their state_dict (megatron/optimizer/base.py `counters`), so a
resumed run continues them instead of restarting at 0: SophiaG's Hessian refreshes and MuonClip's
clipped-head total. Through a checkpoint file loaded the way --load reads it (weights_only)."""
from __future__ import annotations

import torch

from megatron.checkpoint_io import torch_load
from megatron.optimizer.muon import Muon
from megatron.optimizer.sophia import SophiaG


def _roundtrip(opt, fresh, tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"optimizer": opt.state_dict()}, path)
    fresh.load_state_dict(torch_load(str(path))["optimizer"])
    return fresh


def test_sophia_hessian_updates_survive_a_checkpoint(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    opt = SophiaG([p], lr=1e-3)
    p.grad = torch.full((3,), 0.5)
    for _ in range(3):
        opt.update_hessian()
    opt.step()
    assert opt.hessian_updates == 3 and opt.state_dict()["counters"] == {"hessian_updates": 3}
    q = torch.nn.Parameter(torch.ones(3))
    got = _roundtrip(opt, SophiaG([q], lr=1e-3), tmp_path)
    assert got.hessian_updates == 3
    assert torch.equal(got.state[q]["hessian"], opt.state[p]["hessian"])  # the tensors too


def test_muonclip_fired_total_survives_a_checkpoint(tmp_path):
    w = torch.nn.Parameter(torch.eye(4))
    opt = Muon([{"params": [w], "use_muon": True}], lr=0.01, qk_clip_t=5.0)
    opt.qk_clip.fired = 7  # (what QKClip.__call__ accumulates; its clipping is tested in test_optimizer_muon.py)
    got = _roundtrip(opt, Muon([{"params": [torch.nn.Parameter(torch.eye(4))], "use_muon": True}], lr=0.01,
                               qk_clip_t=5.0), tmp_path)
    assert got.qk_clip.fired == 7
    # plain Muon has no QK-clip: nothing saved, nothing to restore
    plain = Muon([{"params": [w], "use_muon": True}], lr=0.01)
    assert plain.state_dict()["counters"] == {}
    assert _roundtrip(plain, Muon([{"params": [w], "use_muon": True}], lr=0.01), tmp_path).qk_clip is None


def test_state_dict_without_counters_still_loads():
    p = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.Optimizer.state_dict(SophiaG([p]))  # as written before counters were kept
    assert "counters" not in old
    opt = SophiaG([torch.nn.Parameter(torch.ones(3))])
    opt.hessian_updates = 0
    opt.load_state_dict(old)
    assert opt.hessian_updates == 0
