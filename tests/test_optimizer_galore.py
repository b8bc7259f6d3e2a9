"""GaLore AdamW: our whole-matrix step (the one that runs under ZeRO, megatron/optimizer/galore.py)
against galore-torch's own GaLoreAdamW on the real tensors, with the registry's settings and a
projection refresh inside the run. (Under ZeRO the same class is held to this single-process run
by tests/test_optimizer_matrix.py.)"""
from __future__ import annotations

import galore_torch  # the test extra installs it (setup.py)
import pytest
import torch

from megatron.optimizer.galore import SETTINGS, GaLoreAdamW, galore_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def test_matches_galore_torch_over_a_projection_refresh():
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 40), (24, 24), (24,)]  # tall, wide, square (rank > min dim: full rank), 1-D
    ours = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    settings = {**SETTINGS, "rank": 8, "update_proj_gap": 3}  # refresh at steps 0, 3, 6 of 7
    groups = galore_groups([{"params": ours}])
    for g in groups:
        g.update({k: settings[k] for k in settings if k in g})
    a = GaLoreAdamW(groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    b = galore_torch.GaLoreAdamW([{"params": ref[:3], **settings}, {"params": ref[3:]}], lr=1e-2,
                                 betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    for step in range(7):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, ref):
        assert (p - q).abs().max().item() <= 2e-6, p.shape
    # the low-rank state really is low-rank (rank 8 of a 48x16 gradient: 48x8 moments)
    assert a.state[ours[0]]["exp_avg0"].shape == (48, 8) and a.state[ours[1]]["exp_avg0"].shape == (8, 40)
