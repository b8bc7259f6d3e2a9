"""Shared pytest configuration: the repo root on sys.path, the `slow` marker, the `one_thread` fixture,
the demo data built once per session (`demo_data`), the `host_reads` recorder."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Every trainer the suite starts would otherwise import wandb and ask its API for a login (1-2.5 s per
# run). Tests of the W&B path pass their own WANDB_MODE (test_training_log.py).
os.environ.setdefault("WANDB_MODE", "disabled")
# The launcher picks DTYPE on a CPU from its flags (bf16 where it has native bf16, else fp32). The suite pins
# it to what a CPU without native bf16 gets, so no expectation depends on the machine running it; the rule
# itself is tested with both kinds of cpuinfo (test_launcher.py), and the demo test runs the machine's real
# choice (test_end_to_end.py).
CPUINFO_NO_BF16 = os.path.join(ROOT, "tests", "assets", "cpuinfo-avx2.txt")
os.environ.setdefault("ALCF_CPUINFO", CPUINFO_NO_BF16)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-second end-to-end tests (still run in CI)")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    models run faster on one thread, and much faster than two on a shared, loaded machine."""
    import torch  # noqa: PLC0415

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@pytest.fixture
def host_reads(monkeypatch):
    """A list that records every read of a tensor's values by the host (`.item()`, `.tolist()`, `.cpu()`,
    `.numpy()`, `float()`, `int()`, `bool()`) while the test runs: each one waits for a GPU/XPU to finish
    all queued work, so code run once per step may make one, not one per layer or parameter."""
    import torch  # noqa: PLC0415

    seen: list[str] = []

    def recording(name, original):
        def read(self, *args, **kwargs):
            seen.append(name)
            return original(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, recording(name, getattr(torch.Tensor, name)))
    return seen


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """The launcher's demo dataset (tools/build_demo_data.py: Shakespeare, its BPE tokenizer, .bin/.idx),
    built once for the whole session (a few seconds each time); tests only read it. Returns the data list."""
    from tools.build_demo_data import build_demo_data  # noqa: PLC0415

    return build_demo_data(str(tmp_path_factory.mktemp("demo-data")))


def pytest_collection_finish(session):
    """The objects imported while collecting (torch, DeepSpeed, the test modules: hundreds of thousands, all
    long-lived) leave the cyclic GC's view, as pretrain_gpt.py does for the trainer: DeepSpeed calls
    gc.collect() while building its bf16 and ZeRO-3 optimizers, and each call walked all of them (~0.3 s in
    a test process); the automatic full collections of the session get as cheap."""
    import gc  # noqa: PLC0415

    gc.freeze()
