"""Muon: parity with torch.optim.Muon (no ZeRO), DeepSpeed's ZeRO-aware Muon on 2 gloo ranks
(orthogonalized updates, same trajectory as single-process Muon), MuonClip's QK-clip.

Run as a script under torchrun, this file is the 2-rank worker of the ZeRO test.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.model import GPTConfig, GPTModel  # noqa: E402
from megatron.optimizer import build_optimizer, deepspeed_initialize_kwargs  # noqa: E402
from megatron.optimizer.muon import (  # noqa: E402
    Muon,
    QKClip,
    is_muon_param,
    max_logits,
    newton_schulz,
    rms_scale,
)

LR, WD, STEPS = 2e-3, 0.0, 10


pytestmark = pytest.mark.usefixtures("one_thread")


def make_args(**kw) -> argparse.Namespace:
    base = dict(optimizer="muon", lr=LR, weight_decay=WD, zero_stage=0, bf16=False, clip_grad=0.0,
                muon_momentum=0.95, muon_nesterov=True, muon_ns_steps=5, muonadamw_beta1=0.9,
                muonadamw_beta2=0.999, muonadamw_eps=1e-8, muonclip_t=100.0, muonclip_alpha=0.5,
                adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8)
    base.update(kw)
    return argparse.Namespace(**base)


def tiny_model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    ffn_hidden_size=48, max_position_embeddings=16, normalization="rmsnorm", swiglu=True,
                    use_rotary_position_embeddings=True, untie_embeddings_and_output_weights=True,
                    add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(cfg)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 17), generator=g) for _ in range(n)]


def loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens[:, :-1], labels=tokens[:, 1:]).mean()


class MultScheduler:
    """Writes lr*lr_mult and wd*wd_mult into every group (what the real scheduler does)."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.step()

    def step(self, **_kw) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = LR * g.get("lr_mult", 1.0)
            g["weight_decay"] = WD * g.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, _sd) -> None:
        pass


def single_process_run(steps: int, ns_dtype: torch.dtype = torch.bfloat16) -> tuple[GPTModel, list[dict]]:
    """Our Muon (the ZeRO-0 path) on the full batch; returns the model and per-step snapshots."""
    model = tiny_model()
    opt = build_optimizer(model, make_args())
    opt.ns_dtype = ns_dtype
    MultScheduler(opt)
    snaps = []
    for tokens in batches(steps):
        opt.zero_grad()
        loss_of(model, tokens).backward()
        snaps.append({n: (p.detach().clone(), p.grad.detach().clone()) for n, p in model.named_parameters()})
        opt.step()
    return model, snaps


# ----------------------------------------------------------------------------- no ZeRO
def test_newton_schulz_orthogonalizes():
    g = torch.randn(24, 40)
    s = torch.linalg.svdvals(newton_schulz(g, 5).float())
    assert s.min() > 0.6 and s.max() < 1.25


def test_routing_rule():
    model = tiny_model()
    muon = {n for n, p in model.named_parameters() if is_muon_param(n, p)}
    assert "language_model.encoder.layers.0.self_attention.query_key_value.weight" in muon
    assert "language_model.encoder.layers.1.mlp.dense_4h_to_h.weight" in muon
    assert not any("embeddings" in n or "output_layer" in n or "norm" in n for n in muon)


def test_parity_with_torch_muon_match_rms_adamw():
    """20 steps on 2-D hidden weights: max |diff| <= 1e-6 vs torch.optim.Muon(adjust_lr_fn="match_rms_adamw")."""
    torch.manual_seed(0)
    shapes = [(32, 16), (16, 48), (24, 24)]
    ours = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = Muon([{"params": ours, "use_muon": True}], lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True,
             ns_steps=5)
    b = torch.optim.Muon(ref, lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=True, ns_steps=5,
                         adjust_lr_fn="match_rms_adamw")
    for step in range(20):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 7 + p.numel()))
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, ref):
        assert (p - q).abs().max().item() <= 1e-6


def test_aux_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10))
    q = torch.nn.Parameter(p.detach().clone())
    a = Muon([{"params": [p], "use_muon": False}], lr=0.01, weight_decay=0.1, adamw_betas=(0.9, 0.95),
             adamw_eps=1e-8)
    b = torch.optim.AdamW([q], lr=0.01, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(20):
        g = torch.randn(10, generator=torch.Generator().manual_seed(step))
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert (p - q).abs().max().item() <= 1e-6


def test_deepspeed_path_builds_deepspeeds_muon_on_our_groups_with_rms_scale():
    model = tiny_model()
    built = build_optimizer(model, make_args(zero_stage=1))
    assert type(built.optimizer).__name__ == "MuonWithAuxAdam"
    assert isinstance(built.optimizer.aux_optimizer, torch.optim.AdamW)
    assert built.ds_config == {"gradient_clipping": 0.0}
    qkv = model.language_model.encoder.layers[0].self_attention.query_key_value.weight  # [64, 32]
    assert built.param_attrs[qkv] == {"use_muon": True}
    for p in (model.language_model.embedding.word_embeddings.weight, model.language_model.output_layer.weight):
        assert built.param_attrs[p] == {"use_muon": False}
    # DeepSpeed scales by sqrt(max(1, A/B)) = sqrt(2); lr_mult makes it 0.2*sqrt(64); wd uses the base lr
    group = next(g for g in built.optimizer.param_groups if any(p is qkv for p in g["params"]))
    assert group["use_muon"] and group["ns_method"] == "standard" and group["momentum"] == 0.95
    assert group["lr_mult"] == pytest.approx(0.2 * 8 / 2 ** 0.5)
    assert group["lr_mult"] * group["wd_mult"] == pytest.approx(1.0)
    adam = [g for g in built.optimizer.param_groups if not g["use_muon"]]
    assert {g["name"] for g in adam} == {"adamw_decay", "adamw_no_decay"}
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in adam)


def test_zero3_and_flags_refused():
    from megatron.optimizer import optimizer_problems

    assert "ZeRO-3" in optimizer_problems(make_args(zero_stage=3))[0]
    errs = optimizer_problems(make_args(zero_stage=1, muon_ns_steps=6, muon_nesterov=False))
    assert any("--muon-ns-steps 6" in e for e in errs) and any("--muon-nesterov false" in e for e in errs)
    assert optimizer_problems(make_args(zero_stage=0, muon_ns_steps=6)) == []
    assert "--zero-stage 0" in optimizer_problems(make_args(optimizer="muonclip", zero_stage=1))[0]


# ----------------------------------------------------------------------------- MuonClip
def test_muonclip_fires_and_bounds_max_logit():
    model = tiny_model()
    attn = model.language_model.encoder.layers[0].self_attention
    with torch.no_grad():  # force huge logits on head 1 (kv group 0) and head 3 (kv group 1)
        w = attn.query_key_value.weight.view(attn.n_kv, attn.group + 2, attn.d, -1)
        w[0, 1] *= 40.0
        w[0, 2] *= 10.0  # k of group 0
        w[0, 0] *= 25.0
        w[1, 1] *= 60.0
        w[1, 2] *= 10.0  # k of group 1
    clip = QKClip(t=5.0, alpha=0.5)
    tokens = batches(1)[0][:, :16]
    clip.attach(model)
    model.train()
    model(tokens)
    attns = list(clip.inputs)
    before = {a: max_logits(a, *clip.inputs[a]) for a in attns}
    expected = sum(int((m > 5.0).sum()) for m in before.values())
    assert before[attn][1] > 5.0 and expected >= 2
    out = clip(model, lambda: [(tokens, torch.ones_like(tokens, dtype=torch.float32))])
    assert out["muonclip_heads_clipped"] == expected and out["muonclip_max_logit"] > 5.0
    for a in attns:
        after = max_logits(a, *clip.inputs[a])
        assert after.max().item() <= 5.0 * (1 + 1e-4)
        under = before[a] <= 5.0  # heads under the threshold keep their logits
        assert torch.allclose(after[under], before[a][under], rtol=1e-4)
        assert torch.allclose(after[~under], torch.full_like(after[~under], 5.0), rtol=1e-4)  # clipped land on t


# ----------------------------------------------------------------------------- ZeRO 1/2 on 2 ranks
# Two runs per stage. "bf16": what users get (DeepSpeed's Newton-Schulz in bf16, torch.compile'd).
# "fp32": DeepSpeed's Newton-Schulz switched to fp32 and compared with our single-process Muon
# with fp32 Newton-Schulz. bf16 rounding alone makes two correct implementations differ by ~1e-2
# relative per orthogonalized entry (more on nearly rank-deficient gradients), so only the fp32
# pair can be held to 1e-4 over 10 steps: it measures what ZeRO adds (partitioning, gathering,
# momentum, the per-group scale, the Muon/AdamW split), which is what this test is about.
def zero_worker(out: str) -> None:
    """2-rank worker: DeepSpeed's ZeRO-1 and ZeRO-2 Muon through our registry (one launch, four
    engines: the start-up dominates); rank 0 writes the results."""
    import deepspeed  # noqa: PLC0415
    from deepspeed.runtime.zero.muon import original_muon  # noqa: PLC0415

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    results: dict = {}
    for precision, stage in (("bf16", 1), ("bf16", 2), ("fp32", 1), ("fp32", 2)):
        if precision == "fp32":
            original_muon.ns_compute_dtype = lambda ns_method="gram": torch.float32
        model = tiny_model()
        ds_config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
        kwargs = deepspeed_initialize_kwargs(model, make_args(zero_stage=stage), ds_config, MultScheduler)
        engine, *_ = deepspeed.initialize(model=model, **kwargs)
        names = [n for n, p in model.named_parameters()]
        snaps = []
        for tokens in batches(STEPS):
            mine = tokens[2 * rank: 2 * rank + 2]
            loss = loss_of(engine, mine)
            engine.backward(loss)
            engine.step()
            snaps.append({n: p.detach().clone() for n, p in zip(names, model.parameters())})
        results[stage, precision] = {"snaps": snaps, "optimizer": type(engine.optimizer).__name__,
                              "basic": type(engine.basic_optimizer).__name__,
                              "groups": [(g["name"], bool(g["use_muon"]), g["lr"])
                                         for g in engine.basic_optimizer.param_groups]}
    if rank == 0:
        torch.save(results, out)


def _run_zero(tmp_path) -> dict:
    out = str(tmp_path / "zero.pt")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  os.path.join(sys.prefix, "torch_extensions"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    from tests.distributed import free_port  # noqa: PLC0415

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.abspath(__file__), "--zero-worker", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


def _well_conditioned(grad: torch.Tensor, floor: float = 0.01) -> bool:
    """"Full rank" in the numerical sense: smallest/largest singular value of the gradient >= floor.
    (Five Newton-Schulz steps lift a direction to ~1 only if its singular value is not negligible;
    at initialization the attention gradients here have ratios below 1e-3.)"""
    s = torch.linalg.svdvals(grad)
    return bool(s.min() / s.max() >= floor)


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> dict:
    return _run_zero(tmp_path_factory.mktemp("zero-muon"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_muon_orthogonalizes_and_matches_single_process(stage, zero_runs):
    res = {precision: zero_runs[stage, precision] for precision in ("bf16", "fp32")}
    model = tiny_model()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    muon_names = {n for n, p in model.named_parameters() if is_muon_param(n, p)}
    for precision in ("bf16", "fp32"):
        r = res[precision]
        assert r["optimizer"] == "DeepSpeedZeroOptimizer" and r["basic"] == "MuonWithAuxAdam"
        # our split reached DeepSpeed: the LM head and embeddings stay on AdamW (DeepSpeed's own name
        # rule would have put output_layer on Muon)
        assert [(name, use) for name, use, _ in r["groups"]] == [
            ("muon0", True), ("muon1", True), ("adamw_decay", False), ("adamw_no_decay", False)]
    # The first update of every hidden matrix with a well-conditioned gradient is orthogonalized:
    # update = lr * 0.2*sqrt(max(A,B)) * O (wd = 0), and O's singular values lie in [0.5, 1.2]. The
    # quintic Newton-Schulz does not converge to exactly 1: relative to their mean they spread over
    # ~[0.77, 1.33] here, for torch.optim.Muon's arithmetic as much as for DeepSpeed's.
    ref_fp32, snaps32 = single_process_run(STEPS, ns_dtype=torch.float32)
    checked = 0
    for n in sorted(muon_names):
        if not _well_conditioned(snaps32[0][n][1]):
            continue
        for precision in ("bf16", "fp32"):
            update = init[n] - res[precision]["snaps"][0][n]
            s = torch.linalg.svdvals(update) / (LR * rms_scale(shapes[n]))
            assert s.min() >= 0.5 and s.max() <= 1.2, (precision, n, s)
            assert s.max() / s.min() <= 1.8, (precision, n, s)
        checked += 1
    assert checked == 4, checked  # the four MLP matrices
    # the filter skips what cannot be orthogonal (a nearly rank-deficient gradient), nothing else
    assert not _well_conditioned(snaps32[0]["language_model.encoder.layers.0.self_attention.dense.weight"][1])
    # fp32 Newton-Schulz on both sides: 10 steps of ZeRO Muon = 10 steps of single-process Muon
    # (measured: <= 4e-7 on every parameter; the issue asks for 1e-4)
    final = dict(ref_fp32.named_parameters())
    worst = max((p - final[n].detach()).abs().max().item() for n, p in res["fp32"]["snaps"][-1].items())
    assert worst <= 1e-5, worst
    # bf16 (the real run): the same trajectory up to bf16 rounding (measured: <= 15% of the distance
    # moved on the nearly rank-deficient attention output, ~1.5% elsewhere; the AdamW half only feels
    # it through the changed activations)
    ref_bf16, _ = single_process_run(STEPS)
    final = dict(ref_bf16.named_parameters())
    for n, p in res["bf16"]["snaps"][-1].items():
        diff = (p - final[n].detach()).abs().max().item()
        moved = (init[n] - final[n].detach()).abs().max().item()
        assert diff <= (0.25 if n in muon_names else 0.02) * moved, (n, diff, moved)

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--zero-worker":
    zero_worker(sys.argv[2])
