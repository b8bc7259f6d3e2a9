"""Coordinate check (tools/mup_coord_check.py): after 3 AdamW steps the RMS of every layer's activations
varies < 2x over an 8x width range under MuP and far more under SP; the same over a 4x depth range
with CompleteP versus plain residual branches."""
from __future__ import annotations

import pytest
import torch

from tools.mup_coord_check import CoordCheckSettings, depth_sweep, plot, width_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def width_sweeps():
    torch.set_num_threads(2)
    s = CoordCheckSettings(steps=3, lr=1e-2)
    return width_sweep([32, 64, 256], False, s), width_sweep([32, 64, 256], True, s)


@pytest.fixture(scope="module")
def depth_sweeps():
    torch.set_num_threads(2)
    s = CoordCheckSettings(steps=3, lr=3e-2)
    return depth_sweep([2, 4, 8], 32, False, s), depth_sweep([2, 4, 8], 32, True, s)


def test_mup_is_flat_in_width_and_sp_is_not(width_sweeps):
    sp, mup = width_sweeps
    assert set(mup.rms) == {"embedding", "logits"} | {f"layer{i}{s}" for i in (0, 1) for s in ("", ".attn", ".mlp")}
    assert mup.max_spread() < 2.0, {k: mup.spread(k) for k in mup.rms}
    assert sp.max_spread() > 10.0, {k: sp.spread(k) for k in sp.rms}
    # SP's growth is in the hidden layers (it keeps the embedding like MuP does)
    assert sp.spread("layer1.attn") > 5 * mup.spread("layer1.attn")
    assert sp.rms["layer1"][-1] > sp.rms["layer1"][0] * 5


def test_completep_is_flat_in_depth(depth_sweeps):
    plain, cp = depth_sweeps
    assert cp.max_spread() < 2.0, {k: cp.spread(k) for k in cp.rms}
    assert plain.max_spread() > 1.5 * cp.max_spread(), {k: plain.spread(k) for k in plain.rms}
    # without depth scaling the residual stream grows with the number of layers
    assert plain.rms["mid_layer"][-1] > 2.0 * plain.rms["mid_layer"][0]


def test_plot_writes_png(width_sweeps, depth_sweeps, tmp_path):
    out = tmp_path / "cc.png"
    plot([("width", width_sweeps[0]), ("width", width_sweeps[1]), ("depth", depth_sweeps[1])], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
