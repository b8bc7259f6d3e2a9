"""Counters of our optimizers kept in their state_dict (megatron/optimizer/base.py `counters`), so a
resumed run continues them instead of restarting at 0: SophiaG's Hessian refreshes and MuonClip's
clipped-head total. Through a checkpoint file loaded the way --load reads it (weights_only)."""
from __future__ import annotations

import os

import pytest
import torch

from megatron.checkpoint.io import torch_load
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


@pytest.mark.parametrize("stage,ranks", [(0, 1), (1, 2), (2, 2)])
def test_muonclip_total_continues_through_a_trainer_resume(tmp_path, stage, ranks):
    """The trainer (ZeRO 0 on 1 rank; ZeRO 1/2 on 2 data-parallel ranks, as a single replica runs
    ZeRO-1/2 as stage 0; fp32, --muonclip-t low enough to clip every step): 4 iterations saving
    at 2, then a resume of the iteration-2 checkpoint to 4. The logged running total at iteration 4
    equals the uninterrupted run's (it restarted at 0 before: at ZeRO-0 until the counters went into
    the optimizer's state_dict, at ZeRO-1/2, whose optimizer files keep only per-parameter state,
    until they went into the checkpoint's client state)."""
    import re  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from distributed import TINY_MODEL, make_dataset, run_trainer  # noqa: PLC0415

    data = make_dataset(str(tmp_path / "data"))

    def args(out: str, extra: tuple) -> list[str]:
        return TINY_MODEL + ["--data-file-list", data, "--split", "98,2,0", "--data-cache-path", f"{out}/cache",
                             "--micro-batch-size", "4", "--global-batch-size", str(4 * ranks), "--train-iters", "4",
                             "--lr", "0.01", "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0",
                             "--zero-stage", str(stage), "--deepspeed", "--seed", "1", "--optimizer", "muonclip",
                             "--muonclip-t", "1e-5", "--metrics-file", f"{out}/metrics.jsonl", *extra]

    def totals(stderr: str) -> dict[int, int]:
        return {int(i): int(n) for i, n in re.findall(r"iteration (\d+) optimizer: .*muonclip_fired_total=(\d+)",
                                                       stderr)}

    ref = str(tmp_path / "ref")
    launch = {"nproc": ranks, "launcher": "ranks"}
    want = totals(run_trainer(args(ref, ("--save", f"{ref}/ckpt", "--save-interval", "2")), **launch).stderr)
    assert sorted(want) == [1, 2, 3, 4] and want[2] > 0 and want[4] > want[2], want
    ckpt = str(tmp_path / "res" / "ckpt")
    shutil.copytree(f"{ref}/ckpt/global_step2", f"{ckpt}/global_step2")
    if stage:  # the optimizer state is in the ZeRO files
        assert any(n.startswith("zero_pp_rank_0") for n in os.listdir(f"{ckpt}/global_step2"))
    with open(f"{ckpt}/latest", "w") as f:
        f.write("global_step2")
    got = totals(run_trainer(args(str(tmp_path / "res"), ("--load", ckpt)), **launch).stderr)
    assert got == {3: want[3], 4: want[4]}
