"""The per-step code runs on a device that is not the CPU, with no host read inside it.

Everything here is tested on a CPU, where a tensor made without `device=` lands on the right device by
luck and a host read (`float()`, `.item()`, `bool()` of a tensor) costs nothing. On a GPU/XPU the first
mixes a CPU and a device tensor (an error for all but 0-d CPU tensors) and the second stalls the device.
Here the model and the optimizers run on `meta` tensors, a device whose values no host code can read and
which no op mixes with CPU tensors: the model's forward and backward in each of its variants (dropout,
learned positions, full and selective recompute, per-document masks and positions, LayerNorm/GELU/bias)
and one step of every optimizer written in megatron/optimizer. (The audit found these clean; the
test keeps them so.)
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
