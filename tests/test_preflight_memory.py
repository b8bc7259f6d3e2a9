"""The memory preflight (megatron/resilience/preflight.py): the estimate's parts worked out by hand, the
parameter count against the real model, the device limits through fake CUDA / XPU / host memory,
the refusal / warning / --skip-memory-check, and the out-of-memory lines of the trainer and the
launcher. The estimate against measured peaks of real runs: bench/memory_preflight.py (numbers in
ALCF/notes/reliability.md)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest
import torch
from distributed import ROOT, TINY_MODEL, make_dataset

from megatron.resilience import preflight as pf
from megatron.arguments import parse_args
from megatron.config import Config

GIB = 2**30


def args_for(extra: list[str]) -> argparse.Namespace:
    return parse_args(TINY_MODEL + ["--micro-batch-size", "2", "--train-iters", "10", "--lr", "0.001",
                                    "--data-path", "unused", *extra], env={})


def cfg(a: argparse.Namespace) -> Config:
    return Config.from_args(a)


def params(a: argparse.Namespace, vocab: int) -> int:
    c = cfg(a)
    return pf.parameters_per_rank(c.model, c.parallel, vocab)


def test_parameter_count_matches_the_model():
    from megatron.model import GPTModel  # noqa: PLC0415
    from megatron.training import model_config  # noqa: PLC0415

    for extra in ([], ["--num-key-value-heads", "4"], ["--num-layers", "3", "--ffn-hidden-size", "96"]):
        a = args_for(extra)
        a.padded_vocab_size = 512
        a.sequence_parallel, a.recompute_granularity, a.recompute_num_layers = False, None, 1
        n = sum(p.numel() for p in GPTModel(model_config(Config.from_args(a))).parameters())
        assert params(a, 512) == n, extra


def test_model_states_by_stage_and_precision_by_hand():
    a = args_for(["--optimizer", "adamw"])
    p = params(a, 512)
    for stage, dp, bf16, want in [
        # (weights, grads, optimizer): fp32 stage 0 = 4P, 4P, 2x4P Adam; ZeRO adds a float32 master (4P),
        # divided over the data-parallel ranks with the states; bf16 and ZeRO-3 also a float32 gradient
        # partition (4P); ZeRO-3 holds the gathered layers whole on top of its weight partition
        (0, 1, False, (4 * p, 4 * p, 8 * p)),
        (1, 4, False, (4 * p, 4 * p, (8 + 4) * p / 4)),
        (2, 4, False, (4 * p, 4 * p / 4, (8 + 4) * p / 4)),
        (3, 4, False, (4 * p / 4 + 4 * p, 4 * p / 4, (8 + 4 + 4) * p / 4)),
        (0, 1, True, (2 * p, 2 * p, (8 + 4 + 4) * p)),
        (1, 2, True, (2 * p, 2 * p, (8 + 4 + 4) * p / 2)),
        (3, 2, True, (2 * p / 2 + 2 * p, 2 * p / 2, (8 + 4 + 4) * p / 2)),
    ]:
        a.zero_stage, a.data_parallel_size, a.bf16 = stage, dp, bf16
        est = pf.estimate_memory(cfg(a), 512, cpu=True)
        assert (est.weights, est.grads, est.optimizer) == pytest.approx(want), (stage, dp, bf16)
    a.bf16, a.zero_stage, a.data_parallel_size = False, 0, 1
    assert pf.estimate_memory(cfg(a), 512, optimizer_copies=1.0).optimizer == 4 * p  # SGD / Lion: one state
    from megatron.optimizer import get_entry  # noqa: PLC0415

    assert [get_entry(n).state_copies for n in ("adamw", "sgd", "lion", "ademamix", "adam8bit")] == [2, 1, 1, 3, 0.5]


def test_activations_by_hand():
    a = args_for(["--seq-length", "32"])  # b=2, s=32, h=64, ffn=128, 4 heads / 2 kv (d=16), 2 layers, V=512
    t, h, ffn, d = 64, 64, 128, 16
    per_layer = t * (5 * h + (2 * 4 + 3 * 2) * d + h + 4 * ffn)
    logits = t * 512 * (4 + 12)
    assert pf.activation_bytes(cfg(a), 512, cpu=True) == pytest.approx(2 * per_layer * 4 + logits)
    a.recompute_granularity = "full"  # layer inputs + one layer recomputed
    assert pf.activation_bytes(cfg(a), 512, cpu=True) == pytest.approx((2 * t * h + per_layer) * 4 + logits)
    a.recompute_granularity, a.bf16 = None, True  # bf16 on CPU: the explicit attention's s x s probabilities
    assert pf.activation_bytes(cfg(a), 512, cpu=True) == pytest.approx(2 * (per_layer + 2 * 4 * 32 * 32) * 2 + t * 512 *
                                                                  (2 + 12))
    a.bf16 = False
    a.micro_batch_size = 4  # linear in the micro-batch
    assert pf.activation_bytes(cfg(a), 512, cpu=True) == pytest.approx(2 * (2 * per_layer * 4 + logits))


class _FakeDevice:
    def __init__(self, free: int, count: int = 2):
        self.free, self.count, self.asked = free, count, []

    def is_available(self):
        return True

    def device_count(self):
        return self.count

    def mem_get_info(self, i):
        self.asked.append(i)
        return self.free, 2 * self.free


def test_device_limits_with_fakes(monkeypatch):
    a = args_for([])
    fake = _FakeDevice(7 * GIB)
    monkeypatch.setattr(torch.cuda, "is_available", fake.is_available)
    monkeypatch.setattr(torch.cuda, "device_count", fake.device_count)
    monkeypatch.setattr(torch.cuda, "mem_get_info", fake.mem_get_info)
    assert pf.device_memory_limit(cfg(a).runtime, env={"LOCAL_RANK": "3"}) == (7 * GIB, "free memory of cuda:1")
    assert fake.asked == [1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    xpu = _FakeDevice(5 * GIB, count=12)
    monkeypatch.setattr(torch, "xpu", xpu, raising=False)
    assert pf.device_memory_limit(cfg(a).runtime, env={"LOCAL_RANK": "3"}) == (5 * GIB, "free memory of xpu:3")
    monkeypatch.setattr(torch, "xpu", argparse.Namespace(is_available=lambda: False), raising=False)
    # CPU: host MemAvailable shared by the ranks of this node
    monkeypatch.setattr(pf, "meminfo_available", lambda: 20 * GIB)
    assert pf.device_memory_limit(cfg(a).runtime, env={"LOCAL_WORLD_SIZE": "4"}) == (
        5 * GIB, "host MemAvailable 20.0 GiB / 4 rank(s) on this node")
    a.world_size = 2
    assert pf.device_memory_limit(cfg(a).runtime, env={})[0] == 10 * GIB  # no local size known: every rank on this node


def test_meminfo_parsing(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal:       25000000 kB\nMemFree:  1 kB\nMemAvailable:   1048576 kB\n")
    assert pf.meminfo_available(str(p)) == GIB
    assert pf.meminfo_available(str(tmp_path / "nope")) is None


def test_refuse_warn_skip():
    a = args_for([])  # tiny: ~0.6 GiB, runtime included
    est = pf.estimate_memory(cfg(a), 512, cpu=True)
    probs, warns, _ = pf.memory_problems(cfg(a), 512, limit=(int(est.total * 1.5), "fake"))
    assert (probs, warns) == ([], [])
    probs, warns, _ = pf.memory_problems(cfg(a), 512, limit=(int(est.total / 0.9), "fake"))
    assert probs == [] and warns == [f"memory is tight: the estimate is {est.total / GIB:.1f} GiB per rank, 90% of "
                                     f"the {est.total / 0.9 / GIB:.1f} GiB available (fake)"]
    probs, warns, _ = pf.memory_problems(cfg(a), 512, limit=(int(est.total * 0.5), "fake"))
    assert len(probs) == 1 and probs[0].startswith(f"not enough memory: the estimate is {est.total / GIB:.2f} GiB "
                                                   "per rank (weights ")
    assert "above the" in probs[0] and "--skip-memory-check" in probs[0]
    a.skip_memory_check = True
    assert pf.memory_problems(cfg(a), 512, limit=(1, "fake")) == ([], [], None)


def test_check_memory_returns_the_estimate(monkeypatch):
    """check_memory sets nothing on the configuration: it returns the estimate's line (the trainer keeps it
    for the out-of-memory message), None when no estimate is made, and refuses what does not fit."""
    a = args_for([])
    a.padded_vocab_size = 512
    config = cfg(a)
    monkeypatch.setattr(pf, "meminfo_available", lambda: 1000 * GIB)
    assert pf.check_memory(config) == pf.estimate_memory(config, 512).describe()
    assert config.runtime.memory_estimate is None
    assert pf.check_memory(config.replace(skip_memory_check=True)) is None
    monkeypatch.setattr(pf, "meminfo_available", lambda: GIB // 100)
    with pytest.raises(pf.ArgumentError, match="not enough memory: the estimate is "):
        pf.check_memory(config)


def test_7b_on_24_gib_is_refused_with_fixes():
    """The 7B preset (fp32 on CPU, ZeRO-1, one rank, micro-batch 1 x 4096) against 24 GiB."""
    a = parse_args(["--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32",
                    "--num-key-value-heads", "8", "--ffn-hidden-size", "11008", "--seq-length", "4096",
                    "--max-position-embeddings", "65536", "--swiglu", "--normalization", "rmsnorm",
                    "--disable-bias-linear", "--use-rotary-position-embeddings",
                    "--untie-embeddings-and-output-weights", "--micro-batch-size", "1", "--train-iters", "10",
                    "--lr", "0.001", "--zero-stage", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size",
                    "256000", "--data-path", "unused"], env={})
    probs, _, est = pf.memory_problems(cfg(a), 256000, limit=(24 * GIB, "host"))
    from megatron.training import model_config  # noqa: PLC0415

    a.padded_vocab_size, a.sequence_parallel, a.recompute_granularity, a.recompute_num_layers = 256000, False, None, 1
    p = params(a, 256000)
    assert p == model_config(Config.from_args(a)).num_parameters() == 7_768_117_248  # the model config's own count
    assert a.zero_stage == 0  # one data-parallel replica runs ZeRO-1 as stage 0 (megatron/arguments.py)
    assert est.model_states == pytest.approx(16 * p)  # fp32 weights + gradients + Adam's two moments
    assert len(probs) == 1 and "above the 24.0 GiB available (host)" in probs[0]
    # nothing on one rank fits: more ranks with ZeRO-3 or a smaller model
    assert "cheapest fixes: " in probs[0] and ("x the ranks" in probs[0] or "a smaller model" in probs[0])


def test_fixes_are_the_ones_that_fit():
    a = args_for(["--micro-batch-size", "8", "--global-batch-size", "8", "--seq-length", "64",
                  "--max-position-embeddings", "64"])
    full = pf.estimate_memory(cfg(a), 512, cpu=True).total
    recompute = pf.estimate_memory(cfg(a).replace(recompute_granularity="full"), 512, cpu=True).total
    assert recompute < full
    fixes = pf._fixes(cfg(a), 512, (recompute + full) / 2, 2.0)
    assert any(f.startswith("USE_ACTIVATION_CHECKPOINTING=1") for f in fixes)
    assert any(f.startswith("MICRO_BATCH=1") for f in fixes)


# ----------------------------------------------------------------------------- through the trainer / launcher
@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("toy-data")))


def test_check_args_refuses_what_cannot_fit(data_list, tmp_path):
    big = ["--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32", "--num-key-value-heads",
           "8", "--ffn-hidden-size", "11008", "--seq-length", "4096", "--max-position-embeddings", "4096", "--swiglu",
           "--normalization", "rmsnorm", "--disable-bias-linear", "--use-rotary-position-embeddings",
           "--untie-embeddings-and-output-weights", "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000",
           "--micro-batch-size", "1", "--train-iters", "10", "--lr", "0.001", "--data-file-list", data_list,
           "--check-args"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *big], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path))
    assert time.perf_counter() - t < 20
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("ERROR:")]
    avail = pf.meminfo_available()
    if avail is not None and avail > 200 * GIB:  # pragma: no cover - a machine with that much RAM
        pytest.skip("this host has more memory than a 7B fp32 run needs")
    assert p.returncode == 2 and len(errors) == 1 and errors[0].startswith("ERROR: not enough memory: the estimate is ")
    assert "host MemAvailable" in errors[0] and os.listdir(tmp_path) == []
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *big, "--skip-memory-check"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]


def test_trainer_oom_is_one_line(monkeypatch, capsys):
    import pretrain_gpt  # noqa: PLC0415
    from megatron import training  # noqa: PLC0415

    def boom(args):
        args.memory_estimate = "3.0 GiB per rank (...)"
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "pretrain", boom)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = pretrain_gpt.main(TINY_MODEL + ["--micro-batch-size", "2", "--train-iters", "1", "--lr", "0.001",
                                           "--data-path", "unused"])
    err = capsys.readouterr().err
    assert code == pf.OOM_EXIT_CODE == 6
    assert err.strip().splitlines() == ["ERROR: rank 0 ran out of memory (CUDA out of memory. Tried to allocate 2.00 "
                                        "GiB); the memory estimate was 3.0 GiB per rank (...); cheapest fixes: "
                                        f"{pf.FIXES} (ALCF/notes/reliability.md, 'Memory')"]
    assert pf.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8"))
    assert pf.is_out_of_memory(RuntimeError("XPU out of memory. Tried to allocate"))
    assert not pf.is_out_of_memory(RuntimeError("size mismatch"))


def test_launcher_names_a_sigkilled_rank(tmp_path):
    fake = tmp_path / "fake_trainer.py"
    fake.write_text("import os, sys\nprint('[x][I][megatron.training] memory estimate: 30.0 GiB per rank (fake)', "
                    "file=sys.stderr, flush=True)\nos.kill(os.getpid(), 9)\n")
    lst = tmp_path / "list.txt"
    lst.write_text("1.0 /data/books books\n")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
           "ALCF_HOSTNAME": "testbox", "ALCF_CPUINFO": os.environ["ALCF_CPUINFO"], "WORKING_DIR": str(tmp_path), "DATA_FILE_LIST": str(lst), "EXEC": str(fake),
           "MODEL_ARCH": "tiny", "TRAIN_ITERS": "5", "PYTHON": sys.executable, "VIRTUAL_ENV": sys.prefix}
    p = subprocess.run(["bash", os.path.join(ROOT, "train_alcf.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 137, p.stdout + p.stderr
    lines = [ln for ln in p.stdout.splitlines() if "signal 9" in ln]
    assert lines == ["[train_alcf] a rank was killed by signal 9 (SIGKILL), most likely out of memory (the kernel "
                     "OOM killer; check dmesg); memory estimate: 30.0 GiB per rank (fake)"]


def test_launcher_refuses_the_7b_preset_on_this_machine(data_list, tmp_path):
    """`bash train_alcf.sh` with MODEL_ARCH unset (the 7B preset) on a 24 GiB CPU machine: refused by
    the trainer's --check-args within 20 s, the estimate in the line, nothing written."""
    avail = pf.meminfo_available()
    if avail is None or avail > 100 * GIB:  # pragma: no cover - a machine where it might fit
        pytest.skip("needs a machine with less than 100 GiB available")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8",
           "ALCF_HOSTNAME": "testbox", "ALCF_CPUINFO": os.environ["ALCF_CPUINFO"], "WORKING_DIR": str(tmp_path), "DATA_FILE_LIST": data_list,
           "TOKENIZER_TYPE": "NullTokenizer", "TRAIN_ITERS": "5", "PYTHON": sys.executable,
           "VIRTUAL_ENV": sys.prefix, "PYTHONPATH": ROOT}
    t = time.perf_counter()
    p = subprocess.run(["bash", os.path.join(ROOT, "train_alcf.sh"), "--vocab-size", "32000"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t < 20
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("ERROR:")]
    assert p.returncode == 2 and len(errors) == 1, p.stdout + p.stderr
    # 32 layers x (25.2M attention + 135.3M MLP) + 2 x 32000 x 4096 embeddings = 5933M; fp32 ZeRO-0 (one replica)
    assert errors[0].startswith("ERROR: not enough memory: the estimate is ") and "5933M parameters per rank, fp32, " \
        "ZeRO-0" in errors[0] and "(weights 22.10, gradients 22.10, optimizer 44.21" in errors[0], errors[0]
    assert "nothing was started" in p.stderr and os.listdir(tmp_path) == []
