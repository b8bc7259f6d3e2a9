"""What megatron/deepspeed_compat/ relies on in DeepSpeed, checked by
name (so a DeepSpeed upgrade that moves one of them fails here, not silently in a run), and the fp64
norms against a case where a plain fp32 norm is measurably off. The behaviour end to end (every stage and
precision, 2 ranks) is tests/test_optimizer_matrix.py."""
from __future__ import annotations

import inspect
import os

import pytest
import torch

from megatron import deepspeed_compat as compat
from megatron.config import Config


def test_the_deepspeed_internals_we_replace_or_read_exist():
    import deepspeed.runtime.bf16_optimizer as bf16
    import deepspeed.runtime.fp16.fused_optimizer as fused
    from deepspeed.runtime import utils
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    # module-level names the half-precision optimizers call (replaced by the fp64 versions)
    assert bf16.get_global_norm_of_tensors is utils.get_global_norm_of_tensors or \
        bf16.get_global_norm_of_tensors.__module__ == "megatron.deepspeed_compat.norms"
    assert callable(fused.get_weight_norm)
    assert list(inspect.signature(utils.get_global_norm_of_tensors).parameters)[:4] == [
        "input_tensors", "norm_type", "mpu", "moe_ep_group"]
    assert list(inspect.signature(utils.get_weight_norm).parameters)[:3] == ["parameters", "norm_type", "mpu"]
    # methods overridden per engine / optimizer instance
    assert list(inspect.signature(DeepSpeedZeroOptimizer.get_grad_norm_direct).parameters)[1:4] == [
        "gradients", "params", "norm_type"]
    for name in ("clip_fp32_gradients", "_take_model_step", "zero_optimization_stage", "bfloat16_enabled",
                 "fp16_enabled", "gradient_clipping"):
        assert callable(getattr(DeepSpeedEngine, name)), name
    # partition bookkeeping read by the layouts (ZeRO 1/2, bf16, ZeRO-3)
    src12 = inspect.getsource(DeepSpeedZeroOptimizer)
    for attr in ("single_partition_of_fp32_groups", "bit16_groups", "real_dp_process_group", "update_lp_params"):
        assert attr in src12, attr
    assert "fp32_groups_flat_partition" in inspect.getsource(bf16.BF16_Optimizer)
    src3 = inspect.getsource(DeepSpeedZeroOptimizer_Stage3)
    for attr in ("fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat", "_get_sub_group_process_group"):
        assert attr in src3, attr
    from deepspeed.utils.tensor_fragment import tensor_fragment
    assert {"lp_fragment_address", "hp_fragment_address"} <= set(tensor_fragment.__dataclass_fields__)



def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_engine_overrides_rely_on_what_deepspeed_has():
    """One line per function of megatron/deepspeed_compat/engine.py and partitions.py: the DeepSpeed
    attribute it replaces or reads, by name and (for methods) signature."""
    import deepspeed.runtime.engine as eng
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import safe_get_full_grad

    engine_src = inspect.getsource(eng.DeepSpeedEngine)
    # allow_fp16_on_cpu
    assert callable(get_accelerator().is_fp16_supported)
    # defer_loss_scale_growth: ZeRO 1/2 and 3 call self._update_scale(overflow) from step()
    for cls in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert _params(cls._update_scale)[:2] == ["self", "has_overflow"], cls
        assert "self._update_scale(" in inspect.getsource(cls), cls
    # skip_single_replica_allreduce: the engine's backward reads the flag
    assert "self.enable_backward_allreduce" in engine_src
    # skip_single_replica_reduction: ZeRO 1/2 reduce through self.buffered_reduce_fallback without contiguous
    # buckets, over real_dp_process_group, and keep sequence_parallel_size / contiguous_gradients
    zero12_src = inspect.getsource(DeepSpeedZeroOptimizer)
    assert "self.buffered_reduce_fallback(None, bucket.grads" in zero12_src
    assert _params(DeepSpeedZeroOptimizer.buffered_reduce_fallback)[:3] == ["self", "rank", "grads"]
    for attr in ("self.real_dp_process_group", "self.sequence_parallel_size", "self.contiguous_gradients"):
        assert attr in zero12_src, attr
    # skip_single_replica_allreduce with BF16_Optimizer: the engine reduces its fp32 gradient copies there
    fallback_src = inspect.getsource(eng.DeepSpeedEngine.buffered_allreduce_fallback)
    assert "self.optimizer.get_grads_for_reduction()" in fallback_src
    # share_single_replica_master_weights: ZeRO 1/2 step the fp32 master and copy it into the weights' partition;
    # _link_all_hp_params rebuilds the parameters' links into the master (as DeepSpeed does after moving it)
    step_src = inspect.getsource(DeepSpeedZeroOptimizer.step)
    assert "bit16_partitions[partition_id].data.copy_(fp32_partition.data)" in step_src
    assert _params(DeepSpeedZeroOptimizer._link_all_hp_params) == ["self"]
    for attr in ("self.single_partition_of_fp32_groups", "self.parallel_partitioned_bit16_groups", "self.cpu_offload"):
        assert attr in zero12_src, attr
    # reuse_single_replica_gradient_partition: the epilogue keeps get_all_grad_tensors' tensors of the first backward
    # and adds later ones into them; at the boundary get_flat_partition's list is the step's gradient, which step
    # flattens unless it is a GradPartitionBufferGroup (flat_partition); the partition layout it checks
    from deepspeed.runtime.zero import stage_1_and_2 as zero12  # noqa: PLC0415

    epilogue_src = inspect.getsource(DeepSpeedZeroOptimizer.independent_gradient_partition_epilogue)
    for line in ("if i not in self.all_grad_tensors or self.all_grad_tensors[i] is None:",
                 "self.all_grad_tensors[i] = self.get_all_grad_tensors(self.params_in_partition[i],",
                 "avg_new = self.get_all_grad_tensors(self.params_in_partition[i],", "accumulated_grad.add_(new_avg_grad)",
                 "self.averaged_gradients[i] = self.get_flat_partition(", "return_tensor_list=True)"):
        assert line in epilogue_src, line
    assert _params(DeepSpeedZeroOptimizer.get_all_grad_tensors) == ["self", "tensor_list", "dtype"]
    assert _params(DeepSpeedZeroOptimizer.get_flat_partition) == [
        "self", "tensor_list", "first_offset", "partition_size", "dtype", "device", "param_group_idx",
        "return_tensor_list"]
    assert "grad_accum = self.get_param_gradient_attribute(tensor)" in inspect.getsource(
        DeepSpeedZeroOptimizer.get_all_grad_tensors)
    assert "flat_grad_partition = self._get_preflattened_grad_partition(i)" in step_src
    assert "getattr(grad_group, \"flat_partition\", None)" in inspect.getsource(
        DeepSpeedZeroOptimizer._get_preflattened_grad_partition)
    assert _params(zero12.GradPartitionBufferGroup.__init__) == ["self", "grad_buffers", "flat_partition"]
    for attr in ("self.params_in_partition", "self.params_not_in_partition", "self.first_offset", "self.partition_size",
                 "self.round_robin_bit16_padding", "self.gradient_accumulation_dtype", "self.bit16_groups_flat"):
        assert attr in zero12_src, attr
    for name in ("_is_muon_group", "_use_compact_grad_partition_buffer", "get_param_gradient_attribute"):
        assert callable(getattr(DeepSpeedZeroOptimizer, name)), name
    assert "self.pipeline_parallelism = isinstance(model, PipelineModule)" in engine_src
    # add_single_replica_gradients_to_fp32_partition: with an fp32 ("compact") gradient partition the bucket reduction
    # flattens, converts, divides by the group size, all-reduces, adds each gradient into the partition and copies it
    # back; the partition is built anew after each step
    assert _params(DeepSpeedZeroOptimizer._buffered_reduce_fallback_preserving_fp32) == [
        "self", "grads", "grad_params", "communication_data_type", "elements_per_buffer"]
    assert "self._buffered_reduce_fallback_preserving_fp32(bucket.grads," in zero12_src
    allreduce_src = inspect.getsource(DeepSpeedZeroOptimizer._allreduce_noncontiguous_bucket_preserving_fp32)
    for line in ("allreduced = self.allreduce_bucket(grads, communication_data_type)",
                 "source = reduced_grad.view(-1).narrow(0, source_offset, num_elements)",
                 "self._add_to_grad_partition_buffer(output, source)", "grad.copy_(reduced_grad)"):
        assert line in allreduce_src, line
    assert "tensor_to_allreduce = tensor.to(communication_data_type)" in inspect.getsource(
        DeepSpeedZeroOptimizer.allreduce_bucket)
    assert _params(DeepSpeedZeroOptimizer._build_compact_grad_partition_buffer) == ["self", "group_idx"]
    assert _params(DeepSpeedZeroOptimizer._get_compact_grad_partition_slice) == [
        "self", "group_idx", "partition_id", "param_id", "num_elements"]
    assert _params(DeepSpeedZeroOptimizer._add_to_grad_partition_buffer) == ["output", "source"]
    for attr in ("self.grad_start_offset", "self.grad_partition_insertion_offset", "self.overlap_comm"):
        assert attr in zero12_src, attr
    # copy_first_bf16_gradient: BF16_Optimizer adds into the fp32 copies, zeroes them in clear_hp_grads, and
    # the engine calls its backward_epilogue (which calls _update_hp_grad) before reducing
    import deepspeed.runtime.bf16_optimizer as bf16  # noqa: PLC0415

    bf16_src = inspect.getsource(bf16.BF16_Optimizer)
    assert _params(bf16.BF16_Optimizer._update_hp_grad) == ["self", "lp", "group_idx", "param_idx", "clear_lp_grads"]
    assert "hp_grad.data.add_(" in inspect.getsource(bf16.BF16_Optimizer._update_hp_grad)
    assert "flat_gradients.zero_()" in inspect.getsource(bf16.BF16_Optimizer.clear_hp_grads)
    for attr in ("self._update_hp_grad(", "self.clear_hp_grads()", "self.fp32_groups_has_gradients",
                 "self.fp32_groups_gradients[", "self.autoep_folding_tp_group"):
        assert attr in bf16_src, attr
    assert "self.optimizer.backward_epilogue()" in engine_src
    # no_initial_zero_step: the stage 0 half-precision optimizers step once at construction
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    for cls in (FP16_UnfusedOptimizer, FP16_Optimizer):
        assert "self.initialize_optimizer_states()" in inspect.getsource(cls.__init__), cls
        assert "self.optimizer.step()" in inspect.getsource(cls.initialize_optimizer_states), cls
    # skip_bf16_overflow_scan: the stage 0 half-precision optimizer's checker and its NaN skip
    fp16_src = inspect.getsource(FP16_Optimizer)
    assert "overflow_checker" in fp16_src and "_skip_invalid_grad_norm" in fp16_src
    # step_stage0_in_chunks: FP16_UnfusedOptimizer.step as it reimplements it (norm per group, scaler, clip factor,
    # fp32 copies, one step, copy back), and the names it calls
    unfused_step = inspect.getsource(FP16_UnfusedOptimizer.step)
    for line in ("self.overflow = self.overflow_checker.check()", "get_weight_norm(grads_for_norm, mpu=self.mpu)",
                 "self._global_grad_norm = get_global_norm(norm_list=norm_groups)", "self._update_scale(False)",
                 "self.unscale_and_clip_grads(self._global_grad_norm)", "fp32_param.grad = fp16_param.grad.to(",
                 "self.optimizer.step()", "fp16_param.data.copy_(fp32_param.data)", "self.fused_lamb_legacy"):
        assert line in unfused_step, line
    assert _params(FP16_UnfusedOptimizer.unscale_and_clip_grads) == ["self", "total_norm", "apply_scale"]
    import deepspeed.runtime.fp16.unfused_optimizer as unfused_module  # noqa: PLC0415
    for name in ("split_params_grads_into_shared_and_expert_params", "get_weight_norm", "get_global_norm",
                 "is_invalid_grad_norm"):
        assert callable(getattr(unfused_module, name)), name
    # wrap_model_step: the pipeline schedule's optimizer step calls self._take_model_step(lr_kwargs)
    assert _params(eng.DeepSpeedEngine._take_model_step)[:2] == ["self", "lr_kwargs"]
    assert "self._take_model_step(" in inspect.getsource(PipelineEngine._exec_optimizer_step)
    # without_optimizer_shards: save_checkpoint consults save_zero_checkpoint
    assert "self.save_zero_checkpoint" in inspect.getsource(eng.DeepSpeedEngine.save_checkpoint)
    # replace_checkpoint_engine / is_plain_torch_checkpoint_engine
    assert "self.checkpoint_engine" in engine_src
    assert _params(TorchCheckpointEngine.save)[:3] == ["self", "state_dict", "path"]
    assert _params(TorchCheckpointEngine.load)[:3] == ["self", "path", "map_location"]
    # step_without_update: the counter a skipped step advances
    assert "self.skipped_steps" in engine_src
    # partitions.full_grad / zero3_local
    assert _params(safe_get_full_grad) == ["param"]
    assert "ds_tensor" in inspect.getsource(DeepSpeedZeroOptimizer_Stage3)
    assert "partition_numel" in inspect.getsource(DeepSpeedZeroOptimizer_Stage3)
    # partition_zero3_over_sequence_data_parallel: zero.Init converts a built module over the group
    # it is given; DeepSpeed's own conversion would use mpu.get_data_parallel_group (the defect)
    import deepspeed  # noqa: PLC0415
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload  # noqa: PLC0415

    assert {"module", "data_parallel_group", "config_dict_or_path", "mpu", "dtype"} <= set(
        _params(deepspeed.zero.Init.__init__))
    assert "mpu.get_data_parallel_group()" in inspect.getsource(DeepSpeedZeRoOffload._convert_to_zero_parameters)
    # sum_zero3_scatter_over_sequence_parallel: the reduce-scatter path and its averaging over SP x DP
    assert callable(DeepSpeedZeroOptimizer_Stage3._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads)
    stage3_src = inspect.getsource(DeepSpeedZeroOptimizer_Stage3)
    assert "def __avg_scatter_grads(self, params_to_reduce: List[Parameter],\n" in stage3_src
    scatter = stage3_src.split("def __avg_scatter_grads(", 1)[1].split("\n    def ", 1)[0]
    assert "reduce_scatter_coalesced(" in scatter
    assert "sequence_parallel_size" not in scatter  # once DeepSpeed scales it for SP itself, drop ours



def test_the_universal_converter_helpers_exist_with_our_signatures():
    from megatron.deepspeed_compat import universal

    ds = universal.converter()
    for name, params in universal.HELPERS.items():
        assert _params(getattr(ds, name))[:len(params)] == params, name
    for key in universal.KEYS:
        assert isinstance(getattr(ds, key), str), key
    # the tool reaches DeepSpeed's converter through deepspeed_compat only
    tool = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "convert_checkpoint",
                             "ds_to_universal.py")).read()
    assert "import deepspeed.checkpoint.ds_to_universal" not in tool and "converter()" in tool

def test_the_installed_deepspeed_is_in_the_supported_range(monkeypatch):
    """setup.py pins the range the suite ran on; start-up refuses another release with the install
    line, or lets it run with a warning when the user says so."""
    import re
    from importlib.metadata import version

    from megatron import deepspeed_compat as dc

    assert dc.version_problem(version("deepspeed")) is None
    setup = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.py")).read()
    assert re.search(r'"deepspeed([^"]+)"', setup).group(1) == ",".join(dc.SUPPORTED)
    assert dc.version_problem("0.19.0") is None and dc.version_problem("0.19.8+cpu") is None
    for other in ("0.18.9", "0.20.0", "0.20.0rc1", "1.0.0"):
        msg = dc.version_problem(other)
        assert msg.startswith(f"DeepSpeed {other} is installed") and "pip install 'DeepSpeed>=0.19,<0.20'" in msg
        assert dc.ALLOW_ENV in msg
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.16.4")
    monkeypatch.delenv(dc.ALLOW_ENV, raising=False)
    with pytest.raises(RuntimeError, match="DeepSpeed 0.16.4 is installed"):
        dc.check_version()
    monkeypatch.setenv(dc.ALLOW_ENV, "1")
    assert "going on because" in dc.check_version()


def test_fp64_norms_where_fp32_drifts():
    """Many small terms after a large one: the fp64 sum of squares is exact to the last digit."""
    torch.manual_seed(0)
    tensors = [torch.full((1,), 1000.0), torch.randn(3_000_000) * 1e-3, torch.randn(1000, 77)]
    want = float(sum((t.double() ** 2).sum() for t in tensors)) ** 0.5
    got = float(compat.fp64_sq_norm(tensors).sqrt())
    assert abs(got - want) / want < 5e-15
    assert float(compat.fp64_global_norm_of_tensors(tensors)) == torch.tensor(want, dtype=torch.float32).item()
    assert abs(compat.fp64_weight_norm(tensors) - want) / want < 1e-15
    # non-finite: -1 (DeepSpeed's convention for "skip this step")
    assert float(compat.fp64_global_norm_of_tensors([torch.tensor([float("inf")])])) == -1.0


def test_clip_uses_the_fp64_norm_and_deepspeeds_rule():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    norm = compat.fp64_clip_grad_norm_([p], max_norm=1.0)
    assert float(norm) == 5.0
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0, 0.0, 0.0]) / (5.0 + 1e-6))
    p.grad = torch.tensor([0.3, 0.4, 0.0, 0.0])
    compat.fp64_clip_grad_norm_([p], max_norm=1.0)  # under the threshold: unchanged
    torch.testing.assert_close(p.grad, torch.tensor([0.3, 0.4, 0.0, 0.0]))


def _one_rank_engine(port: int, flags: list[str]):
    """(args, engine) of the tiny model's trainer at one rank, with `flags` (stage, precision, clipping)."""
    import os

    from distributed import TINY_MODEL

    from megatron import training
    from megatron.arguments import parse_args
    from megatron.initialize import initialize_megatron

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    args = parse_args(TINY_MODEL + ["--micro-batch-size", "2", "--train-iters", "1", "--lr", "1e-3",
                                    "--data-path", "x", "--eval-iters", "0", *flags], env={"WORLD_SIZE": "1"})
    initialize_megatron(args)
    training.build_tokenizer_and_vocab(args)
    _model, engine = training.setup_model_and_optimizer(args)
    return args, engine


def _one_step(args, engine) -> None:
    from megatron import training

    tokens = torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(0))
    training.train_step(engine, iter([{"text": tokens}]), Config.from_args(args), None, engine.device)


def _clip0_worker(rank: int, port: int, out_dir: str) -> None:
    args, engine = _one_rank_engine(port, ["--clip-grad", "0", "--zero-stage", "0"])
    seen = {}

    def record(*_):  # the gradients as the optimizer receives them (nothing clipped them)
        seen["norm"] = float(compat.fp64_sq_norm([p.grad for p in engine.module.parameters()]).sqrt())
    engine.optimizer.register_step_pre_hook(record)
    _one_step(args, engine)
    norm = engine.get_global_grad_norm()
    torch.save({"norm": None if norm is None else float(norm), "seen": seen["norm"]}, os.path.join(out_dir, "rank0.pt"))


def _bf16_stage0_worker(rank: int, port: int, out_dir: str) -> None:
    from deepspeed.runtime import utils
    from deepspeed.runtime.fp16 import unfused_optimizer

    args, engine = _one_rank_engine(port, ["--bf16", "--zero-stage", "0", "--clip-grad", "1e9"])
    opt = engine.optimizer
    seen = {"optimizer": type(opt).__name__}
    step = opt.step

    def recording_step(*a, **k):  # the bf16 gradients the norm is taken of: float64 copies, and DeepSpeed's fp32 norm
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        seen["fp64"] = float(sum(g.double().square().sum() for g in grads)) ** 0.5
        seen["deepspeed_fp32"] = float(utils.get_weight_norm(grads))
        return step(*a, **k)
    opt.step = recording_step
    _one_step(args, engine)
    seen["norm"] = float(engine.get_global_grad_norm())
    seen["hooked"] = unfused_optimizer.get_weight_norm is not utils.get_weight_norm
    torch.save(seen, os.path.join(out_dir, "rank0.pt"))


def test_stage0_bf16_takes_the_fp64_norm():
    """bf16 at ZeRO stage 0 (DeepSpeed's FP16_UnfusedOptimizer): the gradient norm is the fp64 one, equal to the
    float64 copies' norm within fp64 rounding, not DeepSpeed's one fp32 norm per tensor."""
    import tempfile

    from distributed import spawn_workers

    with tempfile.TemporaryDirectory() as out:
        (r,) = spawn_workers(_bf16_stage0_worker, 1, out)
    assert r["optimizer"] == "FP16_UnfusedOptimizer" and r["hooked"]
    assert abs(r["norm"] - r["fp64"]) / r["fp64"] < 1e-12, r
    assert r["deepspeed_fp32"] != r["norm"]  # what the hook replaces differs (fp32 sums)


def test_stage0_fp32_logs_the_fp64_norm_without_clipping(tmp_path):
    """fp32 at ZeRO stage 0 with --clip-grad 0: DeepSpeed takes no norm at all (grad_norm was logged as
    nan); the engine now reports the fp64 norm of the step's gradients, clipping nothing."""
    from distributed import spawn_workers

    (r,) = spawn_workers(_clip0_worker, 1, str(tmp_path))
    assert r["norm"] is not None and abs(r["norm"] - r["seen"]) / r["seen"] < 1e-7


def _single_replica_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    from distributed import TINY_MODEL

    from megatron import training
    from megatron.arguments import parse_args
    from megatron.initialize import initialize_megatron

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    args = parse_args(TINY_MODEL + ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
                                    "--lr", "1e-2", "--clip-grad", "1.0", "--zero-stage", "1", "--keep-zero-stage",
                                    "--data-path", "x", "--eval-iters", "0"], env={"WORLD_SIZE": "1"})
    initialize_megatron(args)
    training.build_tokenizer_and_vocab(args)
    batches = [{"text": torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(i))} for i in range(6)]
    out = {}
    from megatron import deepspeed_compat

    for name, skip in (("skipped", compat.skip_single_replica_reduction), ("as_is", lambda engine: False)):
        deepspeed_compat.skip_single_replica_reduction = skip
        torch.manual_seed(1234)
        _model, engine = training.setup_model_and_optimizer(args)
        out[f"{name}_installed"] = "buffered_reduce_fallback" in vars(engine.optimizer)
        data = iter(batches)
        config = Config.from_args(args)
        losses = [float(training.train_step(engine, data, config, None, engine.device)) for _ in range(3)]
        out[name] = {"losses": losses, "params": [p.detach().clone() for p in engine.module.parameters()],
                     "norm": float(engine.get_global_grad_norm())}
    torch.save(out, os.path.join(out_dir, "rank0.pt"))


def test_single_replica_zero1_skips_the_reduction_bit_for_bit(tmp_path):
    """Real ZeRO-1 at one rank (--keep-zero-stage), 3 steps of 2 accumulated micro-batches with clipping:
    without DeepSpeed's all-reduce over the group of one, the losses, gradient norm and weights are the
    same bits as with it."""
    from distributed import spawn_workers

    (r,) = spawn_workers(_single_replica_worker, 1, str(tmp_path))
    assert r["skipped_installed"] and not r["as_is_installed"]
    assert r["skipped"]["losses"] == r["as_is"]["losses"] and r["skipped"]["norm"] == r["as_is"]["norm"]
    assert len(r["skipped"]["params"]) == len(r["as_is"]["params"]) > 0
    for a, b in zip(r["skipped"]["params"], r["as_is"]["params"]):
        assert torch.equal(a, b)
    assert r["skipped"]["losses"][2] != r["skipped"]["losses"][0]  # it trained


def test_fp64_sq_norm_of_a_large_tensor_in_chunks():
    """A 3 x 2^20 + 5 element bf16 tensor (four chunks): the sum of squares equals the float64 copy's
    within both sides' fp64 summation error (pairwise: about log2(3.1e6) = 22 roundings of 2^-53 each,
    2.4e-15 relative per side); whole-tensor vector_norm(dtype=float64) was 4.9e-14 off on 24.6M elements."""
    torch.manual_seed(0)
    x = torch.randn(3 * compat.norms.NORM_CHUNK + 5).to(torch.bfloat16)
    want = float(x.double().pow(2).sum())
    got = float(compat.fp64_sq_norm([x, x[:7]]))
    want += float(x[:7].double().pow(2).sum())
    assert abs(got - want) / want < 5e-15


def test_deepspeed_internals_are_reached_only_through_deepspeed_compat():
    """The boundary itself: outside megatron/deepspeed_compat/ no module of megatron/ or tools/ names
    DeepSpeed's runtime, checkpoint or utils packages (its internals)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pattern = re.compile(r"deepspeed\.(runtime|checkpoint|utils)\b")
    offenders = []
    for top in ("megatron", "tools"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            if os.path.join("megatron", "deepspeed_compat") in dirpath:
                continue
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    for i, line in enumerate(open(path), 1):
                        if pattern.search(line):
                            offenders.append(f"{os.path.relpath(path, root)}:{i}: {line.strip()}")
    assert offenders == []


def _zero_vs_stage0_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    from distributed import TINY_MODEL, engine_with

    from megatron import deepspeed_compat, training
    from megatron.arguments import parse_args
    from megatron.initialize import initialize_megatron

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    batches = [{"text": torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(0))}] * 8  # learnable
    # two micro-batches per step: different ones, so that adding the second differs from doubling the first
    mixed = [{"text": torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(i))} for i in range(8)]
    overrides = ("skip_single_replica_allreduce", "share_single_replica_master_weights",
                 "copy_first_bf16_gradient", "reuse_single_replica_gradient_partition",
                 "add_single_replica_gradients_to_fp32_partition")
    originals = {name: getattr(deepspeed_compat, name) for name in overrides}
    out = {}
    cases = [(dtype, zero, as_is, 1) for dtype in ("fp32", "bf16") for zero, as_is in
             ((0, False), (1, False), (1, True), (2, False))]
    # 2 micro-batches: the second one adds (at ZeRO-2 in DeepSpeed's partition, whose first is kept after each backward)
    cases += [(dtype, zero, as_is, 2) for dtype, zero in (("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2))
              for as_is in (False, True)]
    cases += [("bf16", 2, True, 1)]
    for dtype, zero, as_is, micro in cases:
        args = parse_args(TINY_MODEL + ["--micro-batch-size", "2", "--global-batch-size", str(2 * micro),
                                        "--train-iters", "4", "--lr", "1e-2", "--clip-grad", "0.5",
                                        "--zero-stage", str(zero), "--keep-zero-stage", "--data-path", "x",
                                        "--eval-iters", "0"]
                          + (["--bf16"] if dtype == "bf16" else []), env={"WORLD_SIZE": "1"})
        initialize_megatron(args)
        training.build_tokenizer_and_vocab(args)
        installed = {}  # "as is": DeepSpeed's ZeRO-1 without the single-replica changes
        engine = engine_with(args, **{name: (lambda engine: False) if as_is and name in overrides else
                                      (lambda engine, _f=originals[name], _n=name: installed.setdefault(_n, _f(engine)))
                                      for name in overrides})
        data, config = iter(batches if micro == 1 else mixed), Config.from_args(args)
        masters = getattr(engine.optimizer, "single_partition_of_fp32_groups", [])
        grads = []  # where the master's gradient is when the optimizer steps (ZeRO-1/2)
        deepspeed_compat.innermost_optimizer(engine.optimizer).register_step_pre_hook(
            lambda *_: grads.append([m.grad.data_ptr() for m in masters if m.grad is not None]))  # (per group)
        losses, norms = [], []
        for _ in range(4):
            losses.append(float(training.train_step(engine, data, config, None, engine.device)))
            norms.append(float(engine.get_global_grad_norm()))
        out[dtype, zero, as_is, micro] = {
            "losses": losses, "norms": norms, "grads": grads, "installed": installed,
            "optimizer": type(engine.optimizer).__name__,
            "params": [p.detach().float().clone() for p in engine.module.parameters()]}
    # MuonClip scales a weight and its master fragment (PartitionedWeights.scale_model_param): once, when
    # the master is the weights' own buffer
    from megatron.optimizer import client_optimizer

    args = parse_args(TINY_MODEL + ["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "4",
                                    "--zero-stage", "1", "--keep-zero-stage", "--optimizer", "muonclip", "--lr", "1e-2",
                                    "--data-path", "x", "--eval-iters", "0"], env={"WORLD_SIZE": "1"})
    initialize_megatron(args)
    training.build_tokenizer_and_vocab(args)
    _model, engine = training.setup_model_and_optimizer(args)
    weight = engine.module.language_model.encoder.layers[0].self_attention.query_key_value.weight
    before, factor = weight.detach().clone(), torch.linspace(0.5, 1.0, weight.shape[0])[:, None]
    client_optimizer(engine).scale_model_param(weight, factor)
    master = engine.optimizer.single_partition_of_fp32_groups[0]
    out["muonclip"] = {"shared": master.data_ptr() == engine.optimizer.bit16_groups_flat[0].data_ptr(),
                       "scaled": weight.detach().clone(), "want": before * factor}
    torch.save(out, os.path.join(out_dir, "rank0.pt"))


@pytest.mark.slow
def test_single_replica_zero_equals_stage0_and_deepspeed_as_is(tmp_path):
    """Real ZeRO-1/2 at one rank (--keep-zero-stage) against stage 0, 4 steps with clipping, fp32 and bf16.
    The single-replica changes (bf16 ZeRO-1's BF16_Optimizer: no all-reduce over the group of one, its
    first gradient copied rather than added to zeros; fp32 ZeRO-1/2: the weights are the master copy,
    and the gradients go into one flat partition kept from step to step; bf16 ZeRO-2: each gradient added
    straight into its fp32 partition, kept from step to step) are installed where they
    apply and give the same losses, gradient norms and weights, bit for bit, as DeepSpeed's ZeRO-1
    without them, with one micro-batch and with two. With bf16 stage 0's start-up zero step not taken
    (no_initial_zero_step: with it stage 0's losses were 6.2708, 5.6025, 5.8830 against
    ZeRO-1's 6.2708, 5.5533, 6.1975), ZeRO-1/2 equal stage 0 within float rounding (fp32: 1e-6
    relative on the losses and weights; bf16: 2e-3 on the losses and 2^-7 of the largest weight)."""
    from distributed import spawn_workers

    (r,) = spawn_workers(_zero_vs_stage0_worker, 1, str(tmp_path))

    def installed(dtype, zero, as_is=False, micro=1):
        return sorted(name for name, done in r[dtype, zero, as_is, micro]["installed"].items() if done)

    assert installed("fp32", 0) == ["skip_single_replica_allreduce"]
    assert installed("fp32", 1) == installed("fp32", 2) == installed("fp32", 1, False, 2) == installed(
        "fp32", 2, False, 2) == ["reuse_single_replica_gradient_partition", "share_single_replica_master_weights"]
    assert installed("fp32", 1, True) == installed("fp32", 1, True, 2) == installed("fp32", 2, True, 2) == []
    for dtype, zero, micro in (("fp32", 1, 1), ("fp32", 1, 2), ("fp32", 2, 2), ("bf16", 2, 1), ("bf16", 2, 2)):
        grads = r[dtype, zero, False, micro]["grads"]  # the master's gradient: one partition kept from step to step
        per_step = len(grads) // 4  # one optimizer step per parameter group
        assert per_step >= 1 and len(grads) == 4 * per_step and all(len(g) == 1 for g in grads), (dtype, zero, micro)
        assert all(g == grads[k % per_step] for k, g in enumerate(grads)), (dtype, zero, micro)
    assert r["bf16", 0, False, 1]["optimizer"] == "FP16_UnfusedOptimizer"
    assert installed("bf16", 0) == ["skip_single_replica_allreduce"]
    assert r["bf16", 1, False, 1]["optimizer"] == r["bf16", 1, False, 2]["optimizer"] == "BF16_Optimizer"
    assert installed("bf16", 1) == installed("bf16", 1, False, 2) == ["copy_first_bf16_gradient",
                                                                     "skip_single_replica_allreduce"]
    assert installed("bf16", 2) == installed("bf16", 2, False, 2) == ["add_single_replica_gradients_to_fp32_partition"]
    assert r["bf16", 2, False, 1]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert installed("bf16", 1, True) == installed("bf16", 1, True, 2) == installed("bf16", 2, True) == []
    clip = r["muonclip"]  # scaled once, not by factor^2 through the shared master
    assert clip["shared"] and torch.equal(clip["scaled"], clip["want"])
    for dtype, zero, micro in (("fp32", 1, 1), ("fp32", 1, 2), ("fp32", 2, 2), ("bf16", 1, 1), ("bf16", 1, 2),
                               ("bf16", 2, 1), ("bf16", 2, 2)):
        changed, as_is = r[dtype, zero, False, micro], r[dtype, zero, True, micro]
        assert changed["norms"][0] > 0.5, (dtype, zero, micro)  # clipped (--clip-grad 0.5)
        assert changed["losses"] == as_is["losses"] and changed["norms"] == as_is["norms"], (dtype, zero, micro)
        assert all(torch.equal(a, b) for a, b in zip(changed["params"], as_is["params"])), (dtype, zero, micro)
    for dtype in ("fp32", "bf16"):
        base = r[dtype, 0, False, 1]
        assert base["losses"][3] < base["losses"][0] - 0.05, dtype  # it trained
        for zero in (1, 2):
            got = r[dtype, zero, False, 1]
            assert got["losses"][0] == base["losses"][0], (dtype, zero)
            assert got["losses"] == pytest.approx(base["losses"], rel=1e-6 if dtype == "fp32" else 2e-3), (dtype, zero)
            tol = 1e-6 if dtype == "fp32" else 2 ** -7
            for a, b in zip(got["params"], base["params"]):
                assert (a - b).abs().max() <= tol * b.abs().max(), (dtype, zero)


def test_no_shm_inference_op_is_built_on_cpu(monkeypatch):
    """`skip_shm_inference_op` leaves DeepSpeed's CPU backend without its shared-memory all-reduce op,
    whose first use compiles a C++ extension (~53 s of CPU) for an inference-only all-reduce: after it,
    `build_shm_op` (what `TorchBackend.__init__` calls) returns None without loading or compiling."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    import importlib

    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm's `torch` is torch)
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    # what the change relies on: the backend builds the op through build_shm_op, which reads the table
    assert "self.shm_comm_op = build_shm_op()" in inspect.getsource(ds_torch_comm.TorchBackend.__init__)
    assert "__compatible_ops__" in inspect.getsource(ds_torch_comm.build_shm_op)
    assert get_accelerator().create_op_builder("ShareMemCommBuilder").NAME == ShareMemCommBuilder.NAME

    table = deepspeed.ops.__compatible_ops__
    monkeypatch.setitem(table, ShareMemCommBuilder.NAME, table.get(ShareMemCommBuilder.NAME, True))
    loads = []
    monkeypatch.setattr(ShareMemCommBuilder, "load", lambda self, *a, **k: loads.append(self) or "built")
    assert ds_torch_comm.build_shm_op() == "built" and len(loads) == 1  # without the change: built
    assert compat.skip_shm_inference_op() is True
    assert ds_torch_comm.build_shm_op() is None and len(loads) == 1  # with it: neither built nor loaded


def test_deepspeed_muon_kernels_compile_on_first_call_not_at_import(monkeypatch):
    """`defer_muon_compile`: DeepSpeed's Muon module decorates its kernels with `compiler.compile()`
    (torch.compile, which loads Inductor: ~1 s of CPU per rank at every ZeRO start-up). After the change the
    decorator compiles a function on its first call, once, and returns what the compiled function returns;
    in a fresh process, importing the module (as every ZeRO engine does) then loads no Inductor back end."""
    import importlib.util
    import subprocess
    import sys

    from deepspeed.runtime import compiler
    from deepspeed.runtime.zero import utils as zero_utils

    # what the change relies on: the Muon module is the decorator's only user, imported while ZeRO is built
    with open(importlib.util.find_spec("deepspeed.runtime.zero.muon.original_muon").origin) as f:
        assert "@compiler.compile()" in f.read()
    assert "muon_optimizer import MuonWithAuxAdam" in inspect.getsource(zero_utils.is_zero_supported_optimizer)

    monkeypatch.setattr(compiler, "compile", compiler.compile)  # restored after the test
    monkeypatch.delitem(sys.modules, "deepspeed.runtime.zero.muon.original_muon", raising=False)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or (lambda *a: ("compiled", fn(*a))))
    assert compat.defer_muon_compile() is True

    def square(x):
        return x * x

    lazy = compiler.compile()(square)
    assert compiled == [] and lazy.__wrapped__ is square  # decorating compiles nothing
    assert lazy(3) == ("compiled", 9) and compiled == [square]  # the first call compiles, then runs it
    assert lazy(4) == ("compiled", 16) and compiled == [square]  # once
    # already imported: nothing to defer
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.muon.original_muon", object())
    assert compat.defer_muon_compile() is False

    code = ("import sys; from megatron import deepspeed_compat as c; assert c.defer_muon_compile(); "
            "from deepspeed.runtime.zero.muon import muon_optimizer; "
            "print(sorted(m for m in sys.modules if m.startswith('torch._inductor.compile_fx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def _stage0_chunks_worker(rank: int, port: int, out_dir: str) -> None:
    from distributed import TINY_MODEL, engine_with

    from megatron import deepspeed_compat, training
    from megatron.arguments import parse_args
    from megatron.initialize import initialize_megatron

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    args = parse_args(TINY_MODEL + ["--bf16", "--zero-stage", "0", "--micro-batch-size", "2", "--train-iters", "4",
                                    "--lr", "1e-2", "--clip-grad", "0.5", "--data-path", "x", "--eval-iters", "0"],
                      env={"WORLD_SIZE": "1"})
    initialize_megatron(args)
    training.build_tokenizer_and_vocab(args)
    batches = [{"text": torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    original, out = deepspeed_compat.step_stage0_in_chunks, {}
    for name, chunked in (("chunked", lambda engine: original(engine, chunk_elements=20_000)),
                          ("as_is", lambda engine: False)):
        engine = engine_with(args, step_stage0_in_chunks=chunked)
        data, config = iter(batches), Config.from_args(args)
        losses = [float(training.train_step(engine, data, config, None, engine.device)) for _ in range(4)]
        out[name] = {"installed": "step" in vars(engine.optimizer), "losses": losses,
                     "norm": float(engine.get_global_grad_norm()), "optimizer": type(engine.optimizer).__name__,
                     "params": [p.detach().clone() for p in engine.module.parameters()]}
    torch.save(out, os.path.join(out_dir, "rank0.pt"))


def test_stage0_step_in_chunks_is_deepspeeds_step_bit_for_bit(tmp_path):
    """bf16 stage 0, 4 steps with clipping at 0.5 (it clips): DeepSpeed's step with fp32 gradient copies made,
    scaled and stepped 20,000 elements at a time (the tiny model: several chunks, a few parameters each) gives
    the same losses, gradient norm and bf16 weights, bit for bit, as DeepSpeed's own step over all at once."""
    from distributed import spawn_workers

    (r,) = spawn_workers(_stage0_chunks_worker, 1, str(tmp_path))
    assert r["chunked"]["optimizer"] == r["as_is"]["optimizer"] == "FP16_UnfusedOptimizer"
    assert r["chunked"]["installed"] and not r["as_is"]["installed"]
    assert r["chunked"]["losses"] == r["as_is"]["losses"] and r["chunked"]["norm"] == r["as_is"]["norm"]
    assert r["chunked"]["norm"] > 0.5  # clipped
    assert len(r["chunked"]["params"]) == len(r["as_is"]["params"]) > 0
    for a, b in zip(r["chunked"]["params"], r["as_is"]["params"]):
        assert torch.equal(a, b)
    assert r["chunked"]["losses"][3] != r["chunked"]["losses"][0]  # it trained


def test_stage0_step_in_chunks_only_for_per_parameter_optimizers():
    """Stepped once per chunk, an optimizer with a per-step counter or a global statistic would count one
    step several times: only torch's Adam/AdamW get the chunked step, any other keeps DeepSpeed's."""
    from types import SimpleNamespace

    class FP16_UnfusedOptimizer:  # noqa: N801  (what the override recognizes, by DeepSpeed's class name)
        def __init__(self, inner):
            self.optimizer, self.fused_lamb_legacy, self.fp32_groups, self.fp16_groups = inner, False, [], []

    w = torch.nn.Parameter(torch.zeros(3))
    for inner, installed in ((torch.optim.AdamW([w]), True), (torch.optim.Adam([w]), True),
                             (torch.optim.SGD([w], lr=0.1), False), (torch.optim.Adagrad([w]), False)):
        engine = SimpleNamespace(optimizer=FP16_UnfusedOptimizer(inner))
        assert compat.step_stage0_in_chunks(engine) is installed, type(inner).__name__
        assert ("step" in vars(engine.optimizer)) is installed


def test_no_initial_zero_step_builds_without_stepping(monkeypatch):
    """`no_initial_zero_step`: DeepSpeed's stage-0 bf16 optimizer built inside it takes no step (no Adam
    state, no zero gradients made, masters equal to the weights); outside it the constructor steps once,
    and leaving the context puts DeepSpeed's method back."""
    import deepspeed.runtime.fp16.unfused_optimizer as unfused  # noqa: PLC0415
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    monkeypatch.setattr(unfused.dist, "get_rank", lambda *a, **k: 0)  # its one collective call: a log line

    def build():
        weights = [torch.nn.Parameter(torch.randn(8, 4).bfloat16())]
        inner = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.1)
        steps = []
        step = inner.step
        inner.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
        opt = FP16_UnfusedOptimizer(inner, low_precision_dtype=torch.bfloat16, verbose=False)
        return weights, opt, steps

    original = FP16_UnfusedOptimizer.initialize_optimizer_states
    with compat.no_initial_zero_step():
        weights, opt, steps = build()
    assert FP16_UnfusedOptimizer.initialize_optimizer_states is original
    assert steps == [] and not compat.innermost_optimizer(opt).state
    assert torch.equal(opt.fp32_groups[0][0], weights[0].float()) and weights[0].grad is None
    _, opt, steps = build()
    assert steps == [1] and compat.innermost_optimizer(opt).state  # DeepSpeed's own: one zero-gradient step
