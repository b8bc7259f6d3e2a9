"""The trainer's own collectives put their tensors where the process group's backend serves them.

nccl (`cuda:nccl`) and torch's xccl (`xpu:xccl`) have no CPU backend: a CPU tensor in a collective
fails there ("No backend type associated with device type cpu"), which gloo on a CPU never shows.
`parallel_state.collective_device()` picks the device from the group's backend map; here it is
checked against real and faked maps, and every call site of the trainer's small collectives (the
per-step numerics and exit flags, the start-up memory check, the logged sums and timings, the fp64
gradient norm) is run with that device replaced by `meta`, a device no host code can read: each
collective must receive a `meta` tensor (a CPU one means the site ignores the device), and the
gradient norms, which read nothing back, must come out on `meta` too.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.launch_env import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = torch.device("meta")


@pytest.mark.parametrize("config, want", [
    ("cuda:nccl", torch.device("cuda", 3)),
    ("xpu:xccl", torch.device("xpu", 1)),
    ("cpu:gloo,cuda:gloo", torch.device("cpu")),
    ("cpu:ccl,xpu:ccl", torch.device("cpu")),  # oneCCL's bindings serve both: the CPU, as before
    ("cpu:gloo,cuda:nccl", torch.device("cpu")),
])
def test_collective_device_follows_the_backend_map(monkeypatch, config, want):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: config)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch, "xpu", SimpleNamespace(current_device=lambda: 1), raising=False)
    assert parallel_state.collective_device() == want


def test_collective_device_without_a_process_group_or_with_an_unknown_backend(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert parallel_state.collective_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "hpu:hccl")
    with pytest.raises(RuntimeError, match="serves neither the CPU nor a CUDA/XPU device"):
        parallel_state.collective_device()


def test_a_backend_without_cpu_refuses_cpu_tensors_and_gets_its_device():
    """The failure mode, reproduced on a CPU: a real process group whose only backend serves CUDA
    (gloo mapped to `cuda`, as nccl maps) refuses a CPU tensor; `collective_device()` reads that map
    and names the CUDA device (torch.cuda.current_device faked: this torch has no CUDA)."""
    code = textwrap.dedent("""
        import torch, torch.distributed as dist
        from megatron.core import parallel_state
        dist.init_process_group("cuda:gloo", rank=0, world_size=1)
        try:
            dist.all_reduce(torch.ones(1))
            print("cpu tensor accepted")
        except RuntimeError as e:
            print("refused:", e)
        torch.cuda.current_device = lambda: 0
        print("device:", parallel_state.collective_device())
        dist.destroy_process_group()
        dist.init_process_group("gloo", rank=0, world_size=1)
        print("gloo device:", parallel_state.collective_device())
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: No backend type associated with device type cpu" in out.stdout, out.stdout
    assert "device: cuda:0" in out.stdout and "gloo device: cpu" in out.stdout, out.stdout


@pytest.fixture
def meta_world(monkeypatch):
    """Two ranks, collectives recorded instead of run, and the collective device replaced by `meta`
    in every module that asks for it."""
    seen = []

    def record(kind):
        def collective(tensor_or_list, *args, **kwargs):
            tensors = tensor_or_list if isinstance(tensor_or_list, list) else [tensor_or_list]
            tensors += [a for a in args if isinstance(a, torch.Tensor)]
            devices = {t.device for t in tensors}
            seen.append((kind, devices.pop() if len(devices) == 1 else devices))
        return collective

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", record("all_reduce"))
    monkeypatch.setattr(dist, "all_gather", record("all_gather"))
    import megatron.deepspeed_compat.norms as norms
    import megatron.observability.timers as timers

    for module in (timers, parallel_state):  # the others reduce through parallel_state.all_reduce_values
        monkeypatch.setattr(module, "collective_device", lambda group=None: META)
    monkeypatch.setattr(norms, "_accelerator_device", lambda: META)
    return seen


def _reads_back_from_meta(fn):
    """`fn` gives its collective a tensor, then reads the result on the host: impossible on `meta`."""
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        fn()


def test_logged_sums_timers_and_exit_flags_use_the_collective_device(meta_world, monkeypatch):
    from megatron.observability import weight_stats
    from megatron.observability.timers import Timers
    from megatron.resilience.exits import ExitConditions

    _reads_back_from_meta(lambda: parallel_state.all_reduce_values([1.0, 2.0]))  # the training log's sums
    monkeypatch.setattr(weight_stats, "_layout", lambda: (0, 1))  # TP rank 0, one replica
    _reads_back_from_meta(lambda: weight_stats.params_norm(torch.nn.Linear(2, 2)))
    timers = Timers(log_level=1)
    with timers("forward-backward"):
        pass
    _reads_back_from_meta(lambda: timers.gather(["forward-backward"]))
    training = SimpleNamespace(exit_signal_handler=False, exit_interval=0, exit_duration_in_mins=0,
                               kill_switch_file=None)
    _reads_back_from_meta(lambda: ExitConditions(training).reason(1))
    assert meta_world == [("all_reduce", META), ("all_reduce", META), ("all_gather", META), ("all_reduce", META)]


def test_numerics_flag_and_memory_check_use_the_collective_device(meta_world, monkeypatch):
    from megatron.observability.numerics import NumericsGuard
    from megatron.resilience import preflight

    engine = SimpleNamespace(is_gradient_accumulation_boundary=lambda: True, module=torch.nn.Linear(2, 2))
    _reads_back_from_meta(lambda: NumericsGuard().step(engine, torch.tensor(1.0), lambda: None))
    monkeypatch.setattr(preflight, "memory_problems", lambda config, vocab: ([], [], None))
    config = SimpleNamespace(runtime=SimpleNamespace(rank=0, padded_vocab_size=64))
    _reads_back_from_meta(lambda: preflight.check_memory(config))
    assert meta_world == [("all_reduce", META), ("all_reduce", META)]


def test_optimizer_stats_use_the_collective_device(meta_world):
    from megatron.observability.optimizer_stats import optimizer_state_stats

    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([w])
    w.grad = torch.ones(4)
    opt.step()
    _reads_back_from_meta(lambda: optimizer_state_stats(opt, model_numel=8))
    assert meta_world == [("all_reduce", META)]


def test_fp64_gradient_norms_stay_on_the_gradients_device(meta_world):
    """ZeRO-1/2's partition norm and BF16_Optimizer's norm: accumulated on the gradients' device, reduced
    there and returned there, with no host read (which `meta` would refuse); a rank with no gradient of
    its own reduces a zero on the optimizer's device."""
    from megatron.deepspeed_compat import norms

    grads = [torch.empty(3 * norms.NORM_CHUNK + 5, device=META), torch.empty(7, 5, device=META)]
    params = [SimpleNamespace(tensor_model_parallel=True) for _ in grads]
    reduced = []
    zero = SimpleNamespace(dp_process_group=None, model_parallel_rank=0, device=META,
                           _model_parallel_all_reduce=lambda tensor, op: reduced.append(tensor.device))
    norm = norms.fp64_grad_norm_direct(zero, grads, params)
    assert norm.device == META and norm.dtype == torch.float64 and reduced == [META]
    assert norms.fp64_grad_norm_direct(zero, [], []).device == META
    mpu = SimpleNamespace(get_model_parallel_group=lambda: None)
    norm = norms.fp64_global_norm_of_tensors(grads, mpu=mpu)
    assert norm.device == META and norm.dtype == torch.float32
    assert norms.fp64_sq_norm([]).device == META  # nothing to sum: DeepSpeed's device
    assert meta_world == [("all_reduce", META)] * 3  # the two partition norms' DP sums, the MP sum


def test_fp64_sq_norm_on_the_cpu_is_unchanged():
    """The CPU path still sums 2^16-element chunks in fp64 (bit for bit the float64 copy's sum here)."""
    from megatron.deepspeed_compat import norms

    x = torch.randn(2 * norms.NORM_CHUNK + 3, generator=torch.Generator().manual_seed(0))
    got = norms.fp64_sq_norm([x, x[:5]])
    want = sum(float((p.double() ** 2).sum()) for p in (*x.split(norms.NORM_CHUNK), x[:5]))
    assert got.device.type == "cpu" and got.dtype == torch.float64 and abs(float(got) - want) <= 1e-12 * want


# Every torch.distributed collective in megatron/ (module, function): where its tensor comes from.
REVIEWED = {
    ("core/sequence_parallel.py", "whole_sequence_loss"): "the loss and mask (the model's device)",
    ("core/tensor_parallel/cross_entropy.py", "forward"): "logits (the model's device)",
    ("core/tensor_parallel/layers.py", "gather_full"): "a weight (the model's device)",
    ("core/tensor_parallel/mappings.py", "_all_reduce"): "activations / their gradients",
    ("core/tensor_parallel/mappings.py", "_gather"): "activations / their gradients",
    ("deepspeed_compat/norms.py", "_model_parallel_sum"): "fp64_sq_norm's sum, on the gradients' device",
    ("deepspeed_compat/norms.py", "fp64_grad_norm_direct"): "fp64_sq_norm's sum, on the gradients' device",
    ("deepspeed_compat/zero_step.py", "_all_gather_in_shards"): "the bf16 weight partitions",
    ("core/parallel_state.py", "all_reduce_values"): "collective_device() (numerics and exit flags, the memory "
                                                       "check, logged sums and statistics, SophiaG's mean)",
    ("observability/timers.py", "gather"): "collective_device()",
    ("optimizer/muon.py", "__call__"): "attention logit maxima (the model's device)",
    ("optimizer/partition.py", "_reduce"): "sq_norms' sums, on the weights' device",
    ("optimizer/sophia.py", "sampled_label_gradient"): "gradients (the model's device)",
    ("training.py", "dp_mean"): "losses (the model's device)",
}


def test_every_collective_call_site_is_reviewed_for_its_device():
    """A new `dist.<collective>(...)` in megatron/ must say where its tensor lives (REVIEWED above): a CPU
    tensor passes every test here on gloo and fails on nccl/xccl. Reviewed sites that were removed are
    reported too, so the list stays true."""
    import ast
    import pathlib

    collectives = {"all_reduce", "all_gather", "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                   "all_gather_into_tensor", "all_to_all", "all_to_all_single", "gather", "scatter"}
    found = set()
    root = pathlib.Path(ROOT) / "megatron"
    for path in root.rglob("*.py"):
        stack = []

        class Visitor(ast.NodeVisitor):
            def visit_FunctionDef(self, node):
                stack.append(node.name)
                self.generic_visit(node)
                stack.pop()

            visit_AsyncFunctionDef = visit_FunctionDef

            def visit_Call(self, node):
                f = node.func
                if isinstance(f, ast.Attribute) and f.attr in collectives and isinstance(f.value, ast.Name) \
                        and f.value.id == "dist":
                    found.add((path.relative_to(root).as_posix(), stack[-1] if stack else "<module>"))
                self.generic_visit(node)

        Visitor().visit(ast.parse(path.read_text()))
    assert found - set(REVIEWED) == set(), "new collectives: add them to REVIEWED with their tensor's device"
    assert set(REVIEWED) - found == set(), "reviewed collectives no longer in the code: remove them"
