"""Parity of registry optimizers with independent implementations: 20 steps on a small GPT model
(real losses, fp32), max |parameter difference| <= 1e-6.

Each registry optimizer is built exactly as the trainer builds it (`build_optimizer` from parsed
flags: parameter groups, no weight decay on 1-D tensors, betas/eps from the flags); the reference
is built by hand from the reference package on a copy of the model:

* adam / adamw / sgd            torch.optim.Adam / AdamW / SGD
* lion                          lion-pytorch `Lion`
* lamb (variant options)        torch-optimizer `Lamb(clamp_value=10, debias=False)` = our LAMB with
                                `bias_correction=False, weight_norm_clamp=10` (the production `lamb`
                                is bias-corrected without the clamp: checked by hand below)
* adopt                         pytorch-optimizer `ADOPT` (clip step^0.25, L2 weight decay)
* ademamix                      pytorch-optimizer `AdEMAMix(weight_decouple=True)`
* adamwschedulefree / sgdschedulefree   schedulefree's own classes (the registry must pass the flags)
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from test_optimizer_muon import batches, loss_of, tiny_model

from megatron.arguments import parse_args
from megatron.config import Config
from megatron.optimizer import build_optimizer
from megatron.optimizer.lamb import LAMB

STEPS = 20
BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "4", "--train-iters", "30", "--data-path", "x",
        "--zero-stage", "0", "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--adam-eps", "1e-7",
        "--weight-decay", "0.05"]


pytestmark = pytest.mark.usefixtures("one_thread")


def flags(name: str, *extra: str) -> object:
    return parse_args(BASE + ["--optimizer", name, *extra])


def ref_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """Megatron's rule, written out independently: weight decay on >= 2-D weights only."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if p.ndim >= 2 and not n.endswith(".bias")], "weight_decay": wd},
            {"params": [p for n, p in named if p.ndim < 2 or n.endswith(".bias")], "weight_decay": 0.0}]


def run_pair(ours: torch.optim.Optimizer, model: torch.nn.Module, ref: torch.optim.Optimizer,
             ref_model: torch.nn.Module, steps: int = STEPS) -> float:
    """Both optimizers on the same batches; returns the max |difference| of the final parameters."""
    for tokens in batches(steps, seed=3):
        for opt, m in ((ours, model), (ref, ref_model)):
            opt.zero_grad()
            loss_of(m, tokens).backward()
            opt.step()
    worst = 0.0
    for p, q in zip(model.parameters(), ref_model.parameters()):
        worst = max(worst, (p - q).abs().max().item())
    # the run did something: parameters moved well beyond the tolerance
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), tiny_model().parameters()))
    assert moved > 1e-3, moved
    return worst


def pair(name: str, *extra: str):
    args = flags(name, *extra)
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    return args, model, build_optimizer(model, Config.from_args(args)), ref_model


@pytest.mark.parametrize("name,lr", [("adamw", 3e-3), ("adam", 3e-3), ("sgd", 0.2)])
def test_torch_optim(name, lr):
    args, model, ours, ref_model = pair(name, "--lr", str(lr), "--sgd-momentum", "0.7")
    groups = ref_groups(ref_model, 0.05)
    if name == "sgd":
        ref = torch.optim.SGD(groups, lr=lr, momentum=0.7, foreach=False)
    else:
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        ref = cls(groups, lr=lr, betas=(0.8, 0.95), eps=1e-7, foreach=False)
    assert run_pair(ours, model, ref, ref_model) <= 1e-6


def test_lion_vs_lion_pytorch():
    from lion_pytorch import Lion  # noqa: PLC0415

    args, model, ours, ref_model = pair("lion", "--lr", "3e-4")
    ref = Lion(ref_groups(ref_model, 0.05), lr=3e-4, betas=(0.8, 0.95))
    assert run_pair(ours, model, ref, ref_model) <= 1e-6


def test_lamb_variant_vs_torch_optimizer():
    """Our LAMB's options select torch-optimizer's variant (no bias correction, ||w|| clamped to 10)."""
    import torch_optimizer  # noqa: PLC0415

    model = tiny_model()
    ref_model = copy.deepcopy(model)
    ours = LAMB(ref_groups(model, 0.05), lr=1e-2, betas=(0.8, 0.95), eps=1e-7, bias_correction=False,
                weight_norm_clamp=10.0)
    ref = torch_optimizer.Lamb(ref_groups(ref_model, 0.05), lr=1e-2, betas=(0.8, 0.95), eps=1e-7,
                               clamp_value=10.0, debias=False)
    assert run_pair(ours, model, ref, ref_model) <= 1e-6


def test_lamb_production_variant_by_hand():
    """`lamb`: bias-corrected Adam direction plus wd*w, scaled per tensor by ||w||/||u||."""
    args, model, ours, _ = pair("lamb", "--lr", "1e-2")
    p = model.language_model.encoder.layers[0].mlp.dense_4h_to_h.weight
    w0 = p.detach().clone()
    tokens = batches(1, seed=3)[0]
    for step in (1, 2):
        ours.zero_grad()
        loss_of(model, tokens).backward()
        g = p.grad.detach().clone()
        if step == 1:
            m, v = 0.2 * g, 0.05 * g * g
        else:
            m, v = 0.8 * m + 0.2 * g, 0.95 * v + 0.05 * g * g
        u = (m / (1 - 0.8 ** step)) / ((v / (1 - 0.95 ** step)).sqrt() + 1e-7) + 0.05 * w0
        want = w0 - 1e-2 * (w0.norm() / u.norm()) * u
        ours.step()
        assert (p.detach() - want).abs().max().item() <= 1e-6
        w0 = p.detach().clone()


def test_ds_fusedlamb_fallback_clamps_trust_ratio():
    """On CPU `ds.fusedlamb` is `lamb` with the ratio clamped to [0.01, 10] as DeepSpeed's FusedLamb."""
    p = torch.nn.Parameter(torch.full((4, 4), 100.0))  # ||w|| = 400, ||u|| ~ 4 -> ratio 100 -> clamped to 10
    opt = LAMB([p], lr=1e-3, ratio_clamp=(0.01, 10.0))
    p.grad = torch.ones(4, 4)
    opt.step()
    # u = m_hat / (sqrt(v_hat) + eps) = 1 / (1 + 1e-6) everywhere
    assert p.detach() == pytest.approx(torch.full((4, 4), 100.0 - 1e-3 * 10.0 / (1 + 1e-6)), abs=1e-5)


def test_adopt_vs_pytorch_optimizer():
    from pytorch_optimizer import ADOPT  # noqa: PLC0415

    args, model, ours, ref_model = pair("adopt", "--lr", "3e-3")
    ref = ADOPT(ref_groups(ref_model, 0.05), lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decouple=False,
                foreach=False)
    assert run_pair(ours, model, ref, ref_model) <= 1e-6


def test_adopt_first_step_only_initializes():
    args, model, ours, _ = pair("adopt", "--lr", "3e-3")
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, batches(1)[0]).backward()
    ours.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("warmup", [None, 8])
def test_ademamix_vs_pytorch_optimizer(warmup):
    from pytorch_optimizer import AdEMAMix  # noqa: PLC0415

    extra = ["--ademamix-warmup-iters", str(warmup)] if warmup else []
    args, model, ours, ref_model = pair("ademamix", "--lr", "3e-3", "--ademamix-beta3", "0.99",
                                        "--ademamix-alpha", "4.0", *extra)
    ref = AdEMAMix(ref_groups(ref_model, 0.05), lr=3e-3, betas=(0.8, 0.95, 0.99), alpha=4.0, t_alpha_beta3=warmup,
                   eps=1e-7, weight_decouple=True, foreach=False)
    assert run_pair(ours, model, ref, ref_model) <= 1e-6


@pytest.mark.parametrize("name", ["adamwschedulefree", "sgdschedulefree"])
def test_schedulefree_vs_package(name):
    import schedulefree  # noqa: PLC0415

    lr = 3e-3 if name.startswith("adamw") else 0.1
    args, model, ours, ref_model = pair(name, "--lr", str(lr), "--lr-warmup-iters", "5", "--sgd-momentum", "0.8")
    groups = ref_groups(ref_model, 0.05)
    if name.startswith("adamw"):
        ref = schedulefree.AdamWScheduleFree(groups, lr=lr, betas=(0.8, 0.95), eps=1e-7, warmup_steps=5)
    else:
        ref = schedulefree.SGDScheduleFree(groups, lr=lr, momentum=0.8, warmup_steps=5)
    ref.train()
    assert run_pair(ours, model, ref, ref_model) <= 1e-6
    ours.eval()  # the averaged point x, not the gradient point y
    ref.eval()
    worst = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref_model.parameters()))
    assert worst <= 1e-6
    assert not math.isnan(worst)
