"""The optimizer registry, one row per name: every name either takes 3 training steps on a small
in-process model with the loss going down, or is refused at start-up (`parse_args`) with exactly
the message below on this machine. Also: --optimizer choices/help come from the registry, fallbacks
warn once, the loop hooks (schedule-free eval weights, MuonClip through its hook)."""
from __future__ import annotations

import logging
import types

import pytest
import torch
from test_optimizer_muon import batches, loss_of, tiny_model

import megatron.optimizer as registry
from megatron.arguments import ArgumentError, build_parser, parse_args
from megatron.config import Config
from megatron.optimizer import (
    OptimizerHooks,
    build_optimizer,
    get_entry,
    have_module,
    optimizer_names,
)

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "4", "--train-iters", "3", "--data-path", "x"]

# upstream's spellings (ALCF guide) plus the names users ask for
UPSTREAM = ["adam", "adamw", "adam8bit", "adamwschedulefree", "sgdschedulefree", "apex.adam", "apex.sgd",
            "ds.fusedlamb", "ds.onebitlamb", "galoreadamw", "galoreadamw8bit", "galoreadamw8bitperlayer",
            "ipex.fusedlamb", "ipex.lamb", "dshampooadamw", "sophiag", "adopt", "muon", "muonclip", "ds.adamw"]
EXTRA = ["sgd", "lamb", "lion", "ademamix"]

SHAMPOO = ("--optimizer dshampooadamw needs Distributed Shampoo (facebookresearch/optimizers) (python module "
           "'distributed_shampoo', not installed): pip install git+https://github.com/facebookresearch/optimizers.git")


def runs(lr: float, warns: str | None = None, first_step_moves: bool = True) -> dict:
    return {"lr": lr, "warns": warns, "first_step_moves": first_step_moves}


def deepspeed_block(kind: str) -> dict:
    """Built by DeepSpeed from an "optimizer" block (its math: tests/test_launcher_optimizers.py)."""
    return {"ds_block": kind}


def refused(module: str | None, *lines: str) -> dict:
    """`module`: the package whose absence causes the refusal (None: the hardware, always refused here)."""
    return {"module": module, "error": list(lines)}


TABLE: dict[str, dict] = {
    "adamw": runs(1e-2),
    "adam": runs(1e-2),
    "sgd": runs(0.3),
    "apex.adam": runs(1e-2, "--optimizer apex.adam: apex/CUDA not available; running torch.optim.AdamW (same math)"),
    "apex.sgd": runs(0.3, "--optimizer apex.sgd: apex/CUDA not available; running torch.optim.SGD (same math)"),
    # bitsandbytes and galore-torch come with the test extra; the 8-bit kernels need CUDA
    "adam8bit": refused(None, "--optimizer adam8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizer kernels have no "
                        "CPU or XPU implementation): use --optimizer adamw here"),
    "galoreadamw": runs(1e-2),
    "galoreadamw8bit": refused(None, "--optimizer galoreadamw8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizer "
                               "kernels have no CPU or XPU implementation): use --optimizer adamw here"),
    "galoreadamw8bitperlayer": refused(
        None, "--optimizer galoreadamw8bitperlayer steps each layer inside backward hooks, which DeepSpeed's engine "
        "does not support: use --optimizer galoreadamw (or galoreadamw8bit)"),
    "dshampooadamw": refused("distributed_shampoo", SHAMPOO),
    "ds.onebitlamb": refused(None, "--optimizer ds.onebitlamb needs CUDA GPUs (DeepSpeed's OnebitLamb compresses its "
                             "communication with NCCL/cupy); on this machine use --optimizer lamb (or ipex.fusedlamb)"),
    "lamb": runs(1e-2),
    "ipex.lamb": runs(1e-2, "--optimizer ipex.lamb: intel_extension_for_pytorch is not usable here; running the "
                      "same LAMB math from megatron/optimizer/lamb.py"),
    "ipex.fusedlamb": runs(1e-2, "--optimizer ipex.fusedlamb: intel_extension_for_pytorch is not usable here; "
                           "running the same LAMB math from megatron/optimizer/lamb.py"),
    "ds.fusedlamb": runs(1e-2, "--optimizer ds.fusedlamb: DeepSpeed's FusedLamb needs CUDA; running the same LAMB "
                         "math (trust ratio clamped to [0.01, 10]) from megatron/optimizer/lamb.py"),
    "adamwschedulefree": runs(1e-2),
    "sgdschedulefree": runs(0.3),
    "sophiag": runs(1e-3),
    "adopt": runs(1e-2, first_step_moves=False),  # ADOPT's first step only initializes v
    "muon": runs(1e-2),
    "muonclip": runs(1e-2),
    "lion": runs(1e-3),
    "ademamix": runs(1e-2),
    "ds.adamw": deepspeed_block("AdamW"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_table_covers_every_registered_name_and_every_upstream_spelling():
    assert sorted(TABLE) == sorted(optimizer_names())
    assert set(UPSTREAM + EXTRA) == set(optimizer_names())


def test_choices_and_help_come_from_the_registry(capsys):
    action = next(a for a in build_parser()._actions if a.dest == "optimizer")
    assert list(action.choices) == optimizer_names() and action.default == "adamw"
    for name in optimizer_names():
        assert f"{name}: " in action.help
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + ["--optimizer", "adamx", "--lr", "1e-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'adamx'" in err and "ademamix" in err and "muonclip" in err
    with pytest.raises(ValueError, match=r"unknown optimizer .adamx.; valid names: adamw, adam, sgd, ds.adamw, apex.adam, "):
        get_entry("adamx")


@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_name_steps_or_is_refused_at_startup(name, caplog, monkeypatch):
    row = TABLE[name]
    argv = BASE + ["--optimizer", name, "--zero-stage", "0", "--lr", str(row.get("lr", 1e-3))]
    if "error" in row:
        if row["module"] and have_module(row["module"]):
            pytest.skip(f"{row['module']} is installed here: {name} no longer refuses")
        with pytest.raises(ArgumentError) as e:
            parse_args(argv)
        assert str(e.value).splitlines() == row["error"]
        return
    monkeypatch.setattr(registry, "_warned", set())  # warn_once remembers across tests
    config = Config.from_args(parse_args(argv + ["--sophiag-hessian-interval", "1"]))
    model = tiny_model()
    if "ds_block" in row:
        built = build_optimizer(model, config)
        assert isinstance(built, registry.DeepSpeedOptimizer) and built.config["type"] == row["ds_block"]
        assert [p for g in built.param_groups for p in g["params"]]
        assert built.config["params"]["lr"] == config.schedule.lr
        return
    with caplog.at_level(logging.WARNING, logger="megatron.optimizer"):
        opt = build_optimizer(model, config)
        build_optimizer(tiny_model(), config)  # a second build does not warn again
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ([row["warns"]] if row["warns"] else [])
    hooks = OptimizerHooks(types.SimpleNamespace(basic_optimizer=opt, module=model), config.runtime)
    tokens = batches(1)[0]
    losses = []
    for iteration in (1, 2, 3):
        opt.zero_grad()
        loss = loss_of(model, tokens)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        hooks.after_step(iteration, lambda: [(tokens[:, :-1], torch.ones(tokens[:, 1:].shape))])
    with torch.no_grad():
        losses.append(loss_of(model, tokens).item())
    first, *rest = [b - a for a, b in zip(losses, losses[1:])]
    assert first < -1e-3 if row["first_step_moves"] else first == 0.0, losses
    assert all(d < -1e-3 for d in rest), losses


def test_schedulefree_hook_switches_to_averaged_weights_and_back():
    config = Config.from_args(parse_args(BASE + ["--optimizer", "adamwschedulefree", "--zero-stage", "0",
                                                 "--lr", "1e-2"]))
    model = tiny_model()
    opt = build_optimizer(model, config)
    hooks = OptimizerHooks(types.SimpleNamespace(basic_optimizer=opt, module=model), config.runtime)
    for tokens in batches(3):
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()
    y = [p.detach().clone() for p in model.parameters()]
    p0 = next(model.parameters())
    z = opt.state[p0]["z"].clone()
    with hooks.eval_weights():
        assert opt.param_groups[0]["train_mode"] is False
        x = [p.detach().clone() for p in model.parameters()]
        # schedulefree: y = (1 - b1) z + b1 x, so x = (y - (1 - b1) z) / b1
        b1 = opt.param_groups[0]["betas"][0]
        assert torch.allclose(x[0], (y[0] - (1 - b1) * z) / b1, atol=1e-6)
        assert max((a - b).abs().max().item() for a, b in zip(x, y)) > 1e-4  # really other weights
    assert opt.param_groups[0]["train_mode"] is True
    assert all(torch.allclose(a, p, atol=1e-7) for a, p in zip(y, model.parameters()))
    # a checkpoint holds the eval-mode optimizer: hooks built on a loaded one put it back in train mode
    opt.eval()
    OptimizerHooks(types.SimpleNamespace(basic_optimizer=opt, module=model), config.runtime)
    assert opt.param_groups[0]["train_mode"] is True
    assert all(torch.allclose(a, p, atol=1e-6) for a, p in zip(y, model.parameters()))


def test_eval_weights_is_a_no_op_for_other_optimizers():
    config = Config.from_args(parse_args(BASE + ["--optimizer", "adamw", "--zero-stage", "0", "--lr", "1e-2"]))
    model = tiny_model()
    opt = build_optimizer(model, config)
    hooks = OptimizerHooks(types.SimpleNamespace(basic_optimizer=opt, module=model), config.runtime)
    before = [p.detach().clone() for p in model.parameters()]
    with hooks.eval_weights():
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert hooks.after_step(1, lambda: []) == {}


def test_muonclip_through_the_loop_hook_clips_at_muonclip_t():
    """--optimizer muonclip --muonclip-t 5: after a step whose QK logits exceed 5, the hook rescales
    W_q/W_k, so that the next step's forward sees logits <= 5 (up to that step's own update)."""
    config = Config.from_args(parse_args(BASE + ["--optimizer", "muonclip", "--zero-stage", "0", "--lr", "1e-3",
                                                 "--muonclip-t", "5"]))
    model = tiny_model()
    attn = model.language_model.encoder.layers[1].self_attention
    with torch.no_grad():  # a large logit on head 2 (kv group 1)
        w = attn.query_key_value.weight.view(attn.n_kv, attn.group + 2, attn.d, -1)
        w[1, 0] *= 30.0
        w[1, 2] *= 10.0
    opt = build_optimizer(model, config)
    hooks = OptimizerHooks(types.SimpleNamespace(basic_optimizer=opt, module=model), config.runtime)
    tokens = batches(1)[0]
    replay = lambda: [(tokens[:, :-1], torch.ones(tokens[:, 1:].shape))]  # noqa: E731
    outs = []
    for iteration in (1, 2):
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()
        outs.append(hooks.after_step(iteration, replay))
    assert outs[0]["muonclip_heads_clipped"] >= 1 and outs[0]["muonclip_max_logit"] > 5.0
    assert opt.qk_clip.handles and opt.qk_clip.maxes == {}  # attached by the hooks; each step's max consumed
    assert outs[1]["muonclip_fired_total"] >= outs[0]["muonclip_heads_clipped"]
    assert outs[1]["muonclip_max_logit"] <= 5.0 * 1.05  # one small Muon step after the clip


def test_a_new_optimizer_is_one_registry_entry():
    """Adding an optimizer is one `register_optimizer` entry (here in the test alone): --optimizer
    accepts it, --help lists it, its check runs at start-up, the memory preflight reads its state
    size, and `build_optimizer` builds it with the trainer's parameter groups."""
    name = "toy-signsgd"

    def check(config: Config) -> list[str]:
        return ["toy-signsgd takes no weight decay; set --weight-decay 0"] if config.optimizer.weight_decay else []

    try:
        @registry.register_optimizer(name, help="sign of the gradient times the LR", check=check, state_copies=0.0)
        def build(groups, config: Config):
            class SignSGD(torch.optim.Optimizer):
                def step(self, closure=None):
                    for g in self.param_groups:
                        for p in g["params"]:
                            if p.grad is not None:
                                p.data.add_(p.grad.sign(), alpha=-g["lr"])
            return SignSGD(groups, defaults={"lr": config.schedule.lr})

        assert name in optimizer_names() and f"{name}: sign of the gradient times the LR" in \
            " ".join(build_parser().format_help().split())
        with pytest.raises(ArgumentError, match="toy-signsgd takes no weight decay"):
            parse_args(BASE + ["--optimizer", name, "--lr", "0.01", "--weight-decay", "0.1"], env={"WORLD_SIZE": "1"})
        config = Config.from_args(parse_args(BASE + ["--optimizer", name, "--lr", "0.01", "--weight-decay", "0"],
                                             env={"WORLD_SIZE": "1"}))
        assert get_entry(name).state_copies == 0.0
        model = torch.nn.Linear(3, 2)
        opt = build_optimizer(model, config)
        before = model.weight.detach().clone()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        torch.testing.assert_close(model.weight.detach(), before - 0.01 * model.weight.grad.sign())
    finally:
        registry.OPTIMIZERS.pop(name, None)
