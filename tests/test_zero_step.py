"""bf16 ZeRO-1/2's optimizer step made and stepped a chunk at a time (megatron/deepspeed_compat/zero_step.py)."""
from __future__ import annotations

import inspect
import os

import pytest
import torch

from megatron.config import Config
from megatron.deepspeed_compat import zero_step


CASES = (("1", "bf16"), ("2", "bf16"), ("2", "fp32"))  # (ZeRO stage, --grad-accum-dtype); fp32 ZeRO-1 is BF16_Optimizer


def _worker(rank: int, port: int, out_dir: str) -> None:
    from distributed import TINY_MODEL, become_rank, engine_with

    from megatron import deepspeed_compat, training
    from megatron.arguments import parse_args
    from megatron.initialize import initialize_megatron

    become_rank(rank, 2, port)
    out = {}
    original = deepspeed_compat.step_zero12_in_chunks
    batches = [{"text": torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(10 * i + rank))}
               for i in range(3)]
    for stage, grads in CASES:
        args = parse_args(TINY_MODEL + ["--bf16", "--zero-stage", stage, "--grad-accum-dtype", grads,
                                        "--ddp-bucket-size", "10000",
                                        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
                                        "--lr", "1e-2", "--clip-grad", "0.5", "--data-path", "x", "--eval-iters", "0"],
                          env={"WORLD_SIZE": "2"})
        if (stage, grads) == CASES[0]:
            initialize_megatron(args)
        training.build_tokenizer_and_vocab(args)
        for name, install in (("chunked", lambda engine: original(engine, chunk_elements=4096)),
                              ("as_is", lambda engine: False)):
            engine = engine_with(args, step_zero12_in_chunks=install)
            data, config = iter(batches), Config.from_args(args)
            losses = [float(training.train_step(engine, data, config, None, engine.device)) for _ in range(3)]
            opt = engine.optimizer
            master = opt.single_partition_of_fp32_groups[0]
            out[stage, grads, name] = {
                "installed": "step" in vars(opt), "optimizer": type(opt).__name__, "losses": losses,
                "norm": float(engine.get_global_grad_norm()), "size": master.numel(),
                "params": [p.detach().clone() for p in engine.module.parameters()],
                "master": master.detach().clone(),
                "state": {k: v.clone() for k, v in opt.optimizer.state[master].items()}}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_zero12_chunked_step_is_deepspeeds_step_bit_for_bit(tmp_path):
    """bf16 ZeRO-1 and ZeRO-2 on 2 ranks with bf16 gradients (ZeRO-2 also with fp32 ones), 3 steps clipped at 0.5:
    the step that fills and steps 4096 fp32 gradient elements at a time (parameters split across chunks, the
    first step's optimizer state made slice by slice) and gathers the weights 5000 elements per rank at a time
    (--ddp-bucket-size 10000: several all-gathers per group) gives the same losses, norm, bf16 weights, fp32 master partition and Adam
    state (step counter, both moments), bit for bit, as DeepSpeed's step over the whole partition."""
    from distributed import spawn_workers

    for r in spawn_workers(_worker, 2, str(tmp_path)):
        for stage, grads in CASES:
            a, b = r[stage, grads, "chunked"], r[stage, grads, "as_is"]
            assert a["optimizer"] == b["optimizer"] == "DeepSpeedZeroOptimizer"
            assert a["installed"] and not b["installed"]
            assert a["size"] > 3 * 4096  # several chunks
            assert a["losses"] == b["losses"] and a["norm"] == b["norm"] and a["norm"] > 0.5  # clipped
            assert a["losses"][2] != a["losses"][0]  # it trained
            assert torch.equal(a["master"], b["master"])
            assert sorted(a["state"]) == sorted(b["state"]) == ["exp_avg", "exp_avg_sq", "step"]
            for k in a["state"]:
                assert torch.equal(a["state"][k], b["state"][k]), k
            assert float(a["state"]["step"]) == 3
            for x, y in zip(a["params"], b["params"], strict=True):
                assert torch.equal(x, y)


def test_fill_concatenates_pieces_across_chunk_boundaries_and_pads_with_zeros():
    pieces = [torch.arange(5.0).to(torch.bfloat16), torch.arange(10.0, 13.0).to(torch.bfloat16).view(3, 1)]
    flat = torch.cat([p.reshape(-1).float() for p in pieces] + [torch.zeros(4)])  # 12 elements, 4 of padding
    for start, n in ((0, 4), (4, 4), (8, 4), (3, 3), (6, 6)):
        buf = torch.full((n,), 7.0)
        zero_step._fill(buf, pieces, start)
        assert torch.equal(buf, flat[start:start + n]), (start, n)


def test_only_torch_adam_on_bf16_without_offload():
    """Stepped once per chunk, an optimizer with a per-step statistic would count one step several times."""
    from types import SimpleNamespace

    class DeepSpeedZeroOptimizer:  # what the override recognizes, by DeepSpeed's class name
        def __init__(self, inner, dtype=torch.bfloat16, cpu_offload=False):
            self.optimizer, self.dtype, self.cpu_offload, self.zenflow = inner, dtype, cpu_offload, False
            self.torch_autocast_gradscaler, self.has_moe_layers = None, False

        def step(self, closure=None):  # DeepSpeed's, kept for the overflow path
            raise AssertionError("not called here")

    w = torch.nn.Parameter(torch.zeros(3))
    for opt, installed in ((DeepSpeedZeroOptimizer(torch.optim.AdamW([w])), True),
                           (DeepSpeedZeroOptimizer(torch.optim.Adam([w])), True),
                           (DeepSpeedZeroOptimizer(torch.optim.SGD([w], lr=0.1)), False),
                           (DeepSpeedZeroOptimizer(torch.optim.Adagrad([w])), False),
                           (DeepSpeedZeroOptimizer(torch.optim.AdamW([w]), dtype=torch.float16), False),
                           (DeepSpeedZeroOptimizer(torch.optim.AdamW([w]), cpu_offload=True), False)):
        engine = SimpleNamespace(optimizer=opt)
        assert zero_step.step_zero12_in_chunks(engine) is installed, (type(opt.optimizer).__name__, opt.dtype)
        assert ("step" in vars(opt)) is installed


def test_deepspeed_step_is_what_the_chunked_step_mirrors():
    """If DeepSpeed changes its ZeRO-1/2 step, the reimplementation must be checked again: the lines it mirrors."""
    from deepspeed.runtime.zero import stage_1_and_2 as z12

    src = inspect.getsource(z12.DeepSpeedZeroOptimizer.step)
    for line in ("self.micro_step_id = INITIAL_MICRO_STEP_ID", "self.check_overflow(partition_gradients=",
                 "scaled_global_grad_norm = self.scaled_global_norm()", "self._update_scale(self.overflow)",
                 "self._commit_muon_momentum()", "self._global_grad_norm = scaled_global_grad_norm / prev_scale",
                 "self.free_grad_in_param_list(self.params_not_in_partition[i])",
                 "self.flatten_dense_tensors_aligned(self.averaged_gradients[i]",
                 "flat_grad_partition.to(self.single_partition_of_fp32_groups[i].dtype)",
                 "self.unscale_and_clip_grads([single_grad_partition], scaled_global_grad_norm)",
                 "self._optimizer_step(i)", "bit16_partitions[partition_id].data.copy_(fp32_partition.data)",
                 "all_gather_dp_groups(groups_flat=self.bit16_groups_flat,", "self._update_model_bit16_weights(i)"):
        assert line in src, line
    opt_step = inspect.getsource(z12.DeepSpeedZeroOptimizer._optimizer_step)
    assert "self._lazy_init_hp_params_optimizer_state()" in opt_step
    for name in ("_get_preflattened_grad_partition", "_release_preflattened_grad_buffers", "free_grad_in_param_list",
                 "unscale_and_clip_grads", "_lazy_init_hp_params_optimizer_state", "_update_model_bit16_weights"):
        assert callable(getattr(z12.DeepSpeedZeroOptimizer, name)), name


def test_step_slices_equals_one_step_and_a_skipped_step_changes_nothing():
    """torch's fused AdamW over a 1-D master in 4096-element slices (the last one short) == one step over all of it,
    first step (state made per slice) and later ones; with the step turned into a no-op (the numerics guard's
    skipped step, `step_without_update`) nothing changes and no state appears."""
    n, grads = 3 * 4096 + 1000, [torch.randn(3 * 4096 + 1000, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    whole, sliced = torch.nn.Parameter(torch.ones(n)), torch.nn.Parameter(torch.ones(n))
    a = torch.optim.AdamW([whole], lr=0.1, weight_decay=0.1, fused=True)
    b = torch.optim.AdamW([sliced], lr=0.1, weight_decay=0.1, fused=True)
    b.step = lambda *args, **kwargs: None  # skipped: as step_without_update patches the innermost optimizer
    zero_step._step_slices(b, 0, sliced, lambda start, k: grads[0][start:start + k].clone(), n, 4096)
    assert torch.equal(sliced, torch.ones(n)) and sliced not in b.state
    del b.step
    for g in grads:
        whole.grad = g.clone()
        a.step()
        zero_step._step_slices(b, 0, sliced, lambda start, k, g=g: g[start:start + k].clone(), n, 4096)
        assert torch.equal(whole, sliced)
        assert sorted(a.state[whole]) == sorted(b.state[sliced]) and len(b.state) == 1
        for k in a.state[whole]:
            assert torch.equal(a.state[whole][k], b.state[sliced][k]), k
    state = {k: v.clone() for k, v in b.state[sliced].items()}
    b.step = lambda *args, **kwargs: None
    zero_step._step_slices(b, 0, sliced, lambda start, k: grads[0][start:start + k].clone(), n, 4096)
    assert torch.equal(whole, sliced) and all(torch.equal(state[k], b.state[sliced][k]) for k in state)


def _zero3_worker(rank: int, port: int, out_dir: str) -> None:
    import json
    import time

    from distributed import TINY_MODEL, become_rank

    from megatron import training
    from megatron.arguments import parse_args
    from megatron.initialize import initialize_megatron

    become_rank(rank, 2, port)
    batches = [{"text": torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(10 * i + rank))}
               for i in range(3)]
    out = {}
    defaults = {"sub_group_size": 1_000_000_000, "stage3_max_live_parameters": 1_000_000_000,
                "stage3_max_reuse_distance": 1_000_000_000}
    by_layer = training.zero3_fetch_by_layer
    for name, zero in (("defaults", defaults), ("per-module", defaults),
                       ("small", {"sub_group_size": 20_000, "stage3_max_live_parameters": 20_000,
                                  "stage3_max_reuse_distance": 20_000, "stage3_prefetch_bucket_size": 20_000})):
        # per-module: DeepSpeed's fetch of each module's parameters, where the rule would fetch whole layers
        training.zero3_fetch_by_layer = (lambda *a: False) if name == "per-module" else by_layer
        path = os.path.join(out_dir, f"{name}.json")
        if rank == 0:
            with open(path + ".tmp", "w") as f:
                json.dump({"zero_optimization": zero}, f)
            os.replace(path + ".tmp", path)
        while not os.path.exists(path):
            time.sleep(0.01)
        args = parse_args(TINY_MODEL + ["--bf16", "--zero-stage", "3", "--grad-accum-dtype", "bf16",
                                        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
                                        "--lr", "1e-2", "--clip-grad", "0.5", "--data-path", "x", "--eval-iters", "0",
                                        "--deepspeed_config", path], env={"WORLD_SIZE": "2"})
        if name == "defaults":
            initialize_megatron(args)
        training.build_tokenizer_and_vocab(args)
        torch.manual_seed(1234)
        _model, engine = training.setup_model_and_optimizer(args)
        data, config = iter(batches), Config.from_args(args)
        losses = [float(training.train_step(engine, data, config, None, engine.device)) for _ in range(3)]
        out[name] = {"losses": losses, "sub_groups": len(engine.optimizer.fp16_groups),
                     "norm": float(engine.get_global_grad_norm()),
                     "leaves": [type(m).__name__ for m in engine.module.modules() if getattr(m, "_z3_leaf", False)]}
    training.zero3_fetch_by_layer = by_layer
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_zero3_sub_groups_and_released_parameters_train_the_same():
    """ZeRO-3 with the tiny model split into optimizer sub-groups and its parameters released after their forward
    (what zero3_memory_settings chooses for larger models) trains as with DeepSpeed's defaults (one sub-group per
    parameter group, everything kept gathered): the same losses and norm to float rounding, 3 clipped steps on 2 ranks.
    With everything kept gathered the trainer fetches each transformer layer whole: bitwise DeepSpeed's per-module
    fetch."""
    import tempfile

    from distributed import spawn_workers

    with tempfile.TemporaryDirectory() as tmp:
        for r in spawn_workers(_zero3_worker, 2, tmp):
            assert r["defaults"]["sub_groups"] == 2 < r["small"]["sub_groups"]  # 2: with and without weight decay
            # everything kept gathered: each transformer layer fetched as one unit (zero3_fetch_by_layer), the
            # same arithmetic as DeepSpeed's per-module fetch, bit for bit; released parameters: per module
            assert r["defaults"]["leaves"] == ["TransformerLayer"] * 2
            assert r["per-module"]["leaves"] == r["small"]["leaves"] == []
            assert r["defaults"]["losses"] == r["per-module"]["losses"] and r["defaults"]["norm"] == r["per-module"]["norm"]
            assert r["small"]["losses"] == pytest.approx(r["defaults"]["losses"], rel=1e-5)
            assert r["small"]["norm"] == pytest.approx(r["defaults"]["norm"], rel=1e-5)
            assert r["small"]["losses"][2] != r["small"]["losses"][0]
