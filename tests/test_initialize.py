"""Start-up device by device with fake hardware (megatron/initialize.py, megatron/launch_env.py).

No XPU, GPU, IPEX, oneCCL bindings or ezpz exists here: each test installs fakes (fake
`torch.xpu` / `torch.cuda` functions, fake `intel_extension_for_pytorch` /
`oneccl_bindings_for_pytorch` / `ezpz` / `mpi4py` modules, a recording `init_process_group`)
and checks what the start-up does with them: the device, the device index (= local rank), the
backend, the timeout, the order of imports and calls, and what ezpz is handed.
"""
from __future__ import annotations

import datetime
import os
import importlib
import sys
import textwrap
import types

import pytest
import torch
import torch.distributed as dist

from megatron import initialize
from megatron.launch_env import FAMILIES, LaunchEnvError, launch_env, world_size_from_env
from megatron.config import default_args


@pytest.fixture(autouse=True)
def _restore_environ():
    """The start-up code writes RANK / WORLD_SIZE / LOCAL_RANK / DS_ACCELERATOR into os.environ (as it
    must for DeepSpeed); under the fakes here that is this pytest process's environment: put it back, or
    later tests see a 24-rank XPU job."""
    import os  # noqa: PLC0415

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)

FAKE_MODULES = ("intel_extension_for_pytorch", "oneccl_bindings_for_pytorch", "ezpz", "_fake_hw")
LAUNCH_VARS = sorted({v for f in FAMILIES for v in (f.rank, f.size, *f.local_rank, *f.local_size)})


class Hw:
    """The fake machine: what exists, and everything that happened, in order."""

    def __init__(self):
        self.events: list = []
        self.xpu = False  # an XPU is present
        self.xpu_needs_ipex = False  # ... but registers only once IPEX is imported (older frameworks modules)
        self.ipex_imported = False
        self.cuda = False
        self.cuda_bf16 = True
        self.xccl = False
        self.pg = None  # kwargs of init_process_group


@pytest.fixture
def hw(monkeypatch, tmp_path):
    h = Hw()
    for v in LAUNCH_VARS + ["TORCH_DEVICE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "TORCH_BACKEND",
                            "MEGATRON_NO_EZPZ"]:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    fake_hw = types.ModuleType("_fake_hw")
    fake_hw.hw = h
    monkeypatch.setitem(sys.modules, "_fake_hw", fake_hw)
    for name in FAKE_MODULES[:3]:  # absent unless a test installs them
        sys.modules.pop(name, None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # no MPI fallback unless a test installs one
    pkgs = tmp_path / "site"
    pkgs.mkdir()
    monkeypatch.syspath_prepend(str(pkgs))
    h.site = pkgs

    def xpu_available():
        h.events.append("xpu.is_available")
        return h.xpu and (h.ipex_imported or not h.xpu_needs_ipex)

    def init_process_group(**kw):
        h.events.append(("init_process_group", kw["backend"]))
        h.pg = kw

    monkeypatch.setattr(torch.xpu, "is_available", xpu_available)
    monkeypatch.setattr(torch.xpu, "set_device", lambda i: h.events.append(("xpu.set_device", i)))
    monkeypatch.setattr(torch.xpu, "is_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: h.cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: h.events.append(("cuda.set_device", i)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: h.cuda_bf16)
    monkeypatch.setattr(dist, "is_xccl_available", lambda: h.xccl, raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: h.pg is not None)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_backend", lambda *a: h.pg["backend"])
    yield h
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


def install(h: Hw, name: str, body: str = "") -> None:
    """A fake package on sys.path whose import is recorded (and runs `body`)."""
    (h.site / f"{name}.py").write_text(f"from _fake_hw import hw\nhw.events.append('import {name}')\n{body}\n")
    importlib.invalidate_caches()


def ipex(h: Hw) -> None:
    install(h, "intel_extension_for_pytorch", "hw.ipex_imported = True")


def pbs_rank(monkeypatch, rank=13, world=24, local=1):
    """An Aurora rank as mpiexec (PALS) starts it: 2 nodes x 12 tiles."""
    for k, v in {"PMI_RANK": rank, "PMI_SIZE": world, "PALS_LOCAL_RANKID": local, "PALS_LOCAL_SIZE": 12}.items():
        monkeypatch.setenv(k, str(v))


# ------------------------------------------------------------------------------------------------
# device and backend, machine by machine
# ------------------------------------------------------------------------------------------------
def test_aurora_new_torch_xccl(hw, monkeypatch):
    hw.xpu, hw.xpu_needs_ipex, hw.xccl = True, True, True
    ipex(hw)
    pbs_rank(monkeypatch)
    got = initialize.setup_distributed(None, 7.5)
    assert got == (13, 24, 1, "xpu", "xccl")
    ev = hw.events
    # IPEX before the availability check (else XPU would not be found), device before the group
    assert ev.index("import intel_extension_for_pytorch") < ev.index("xpu.is_available")
    assert ev.index(("xpu.set_device", 1)) < ev.index(("init_process_group", "xccl"))
    assert hw.pg["rank"] == 13 and hw.pg["world_size"] == 24
    assert hw.pg["timeout"] == datetime.timedelta(minutes=7.5)
    assert ("cuda.set_device", 1) not in ev
    assert initialize.os.environ["DS_ACCELERATOR"] == "xpu"
    assert (initialize.os.environ["RANK"], initialize.os.environ["LOCAL_RANK"]) == ("13", "1")


def test_aurora_older_torch_ccl_from_bindings(hw, monkeypatch):
    hw.xpu, hw.xpu_needs_ipex = True, True
    ipex(hw)
    install(hw, "oneccl_bindings_for_pytorch")
    pbs_rank(monkeypatch, rank=5, local=5)
    assert initialize.setup_distributed(None, 10) == (5, 24, 5, "xpu", "ccl")
    ev = hw.events
    assert ev.index("import oneccl_bindings_for_pytorch") < ev.index(("init_process_group", "ccl"))
    assert ev.index(("xpu.set_device", 5)) < ev.index(("init_process_group", "ccl"))


def test_aurora_launcher_default_be_ccl(hw, monkeypatch):
    """The launcher passes BE=ccl on Aurora: the bindings are imported when present..."""
    hw.xpu = hw.xccl = True
    install(hw, "oneccl_bindings_for_pytorch")
    pbs_rank(monkeypatch)
    assert initialize.setup_distributed("ccl", 10)[4] == "ccl"
    assert hw.events.index("import oneccl_bindings_for_pytorch") < hw.events.index(("init_process_group", "ccl"))


def test_aurora_be_ccl_without_bindings_uses_xccl(hw, monkeypatch, caplog):
    """... and without them (new frameworks modules) torch's own xccl reaches the same oneCCL, said in the log."""
    hw.xpu = hw.xccl = True
    pbs_rank(monkeypatch)
    with caplog.at_level("INFO", logger="megatron.initialize"):
        assert initialize.setup_distributed("ccl", 10)[4] == "xccl"
    assert "ccl asked for; oneccl_bindings_for_pytorch is not installed, using torch's xccl" in caplog.text


@pytest.mark.parametrize("backend,match", [
    (None, "neither|no xccl backend and oneccl_bindings_for_pytorch is not installed"),
    ("ccl", "needs oneccl_bindings_for_pytorch"),
    ("xccl", "needs an XPU and a torch with xccl"),
    ("nccl", "needs CUDA GPUs, but the device is xpu"),
])
def test_xpu_backend_that_cannot_work_is_refused(hw, monkeypatch, backend, match):
    hw.xpu = True  # neither xccl nor the bindings: upstream fell back to gloo with a warning
    pbs_rank(monkeypatch)
    with pytest.raises(initialize.DeviceSetupError, match=match):
        initialize.setup_distributed(backend, 10)
    assert hw.pg is None  # refused before any process group


def test_ipex_missing_is_fine_when_torch_has_xpu(hw, monkeypatch):
    hw.xpu = hw.xccl = True  # torch >= 2.5: XPU built in, no IPEX installed
    assert initialize.device_type() == "xpu"
    assert "import intel_extension_for_pytorch" not in hw.events


def test_broken_ipex_is_one_clear_error(hw):
    install(hw, "intel_extension_for_pytorch", "raise OSError('libxpu.so: cannot open shared object file')")
    with pytest.raises(initialize.DeviceSetupError, match="installed but does not import.*libxpu.so.*frameworks"):
        initialize.device_type()


def test_cuda_polaris_nccl(hw, monkeypatch):
    hw.cuda = True
    ipex(hw)  # an IPEX install on a CUDA machine changes nothing
    for k, v in {"PMI_RANK": 6, "PMI_SIZE": 8, "PMI_LOCAL_RANK": 2, "PMI_LOCAL_SIZE": 4}.items():
        monkeypatch.setenv(k, str(v))
    assert initialize.setup_distributed("nccl", 3, bf16=True) == (6, 8, 2, "cuda", "nccl")
    assert hw.events.index(("cuda.set_device", 2)) < hw.events.index(("init_process_group", "nccl"))
    assert hw.pg["timeout"] == datetime.timedelta(minutes=3)
    assert initialize.os.environ["DS_ACCELERATOR"] == "cuda"


def test_cuda_default_backend_is_nccl(hw, monkeypatch):
    hw.cuda = True
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "4"), monkeypatch.setenv("LOCAL_RANK", "1")
    assert initialize.setup_distributed(None, 10)[3:] == ("cuda", "nccl")


def test_cuda_without_bf16_refuses_bf16(hw, monkeypatch):
    hw.cuda, hw.cuda_bf16 = True, False  # e.g. a V100
    with pytest.raises(initialize.DeviceSetupError, match="--bf16 on a GPU without bf16 support.*DTYPE=fp32"):
        initialize.setup_distributed(None, 10, bf16=True)
    assert hw.pg is None
    assert initialize.setup_distributed(None, 10, bf16=False)[4] == "nccl"


def test_cpu_gloo(hw, monkeypatch):
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    assert initialize.setup_distributed(None, 0.5, bf16=True) == (1, 2, 1, "cpu", "gloo")
    assert not any(isinstance(e, tuple) and e[0].endswith("set_device") for e in hw.events)
    assert hw.pg["timeout"] == datetime.timedelta(seconds=30)
    assert initialize.os.environ["DS_ACCELERATOR"] == "cpu"


def test_cpu_refuses_nccl(hw):
    with pytest.raises(initialize.DeviceSetupError, match="nccl needs CUDA GPUs, but the device is cpu.*gloo"):
        initialize.setup_distributed("nccl", 10)


def test_torch_device_override(hw, monkeypatch):
    hw.cuda = True
    monkeypatch.setenv("TORCH_DEVICE", "cpu")
    assert initialize.setup_distributed(None, 10)[3:] == ("cpu", "gloo")
    monkeypatch.setenv("TORCH_DEVICE", "tpu")
    with pytest.raises(initialize.DeviceSetupError, match="TORCH_DEVICE=tpu is not one of cpu, cuda, xpu"):
        initialize.device_type()


# ------------------------------------------------------------------------------------------------
# ezpz: handed the user's backend and timeout; the built-in path when it is absent or another package
# ------------------------------------------------------------------------------------------------
EZPZ_NEW = """
import os, torch.distributed as dist
calls = []
def setup_torch(framework=None, backend=None, port=None, seed=None, timeout=None, verbose=False):
    calls.append(dict(framework=framework, backend=backend, timeout=timeout, env=os.environ.get("TORCH_BACKEND")))
    dist.init_process_group(backend=backend, init_method="env://", rank=3, world_size=8,
                            timeout=__import__("datetime").timedelta(seconds=timeout))
    return 3
get_world_size = lambda: 8
get_local_rank = lambda: 3
get_torch_device_type = lambda: "xpu"
"""

EZPZ_OLD = """
import os, torch.distributed as dist
calls = []
def setup_torch(backend="DDP", port=None, seed=None, timeout=None, verbose=False):
    calls.append(dict(backend=backend, timeout=timeout, env=os.environ.get("TORCH_BACKEND")))
    dist.init_process_group(backend=os.environ.get("TORCH_BACKEND", "gloo"), init_method="env://", rank=0,
                            world_size=2, timeout=__import__("datetime").timedelta(seconds=timeout))
    return 0
get_world_size = lambda: 2
get_local_rank = lambda: 0
get_torch_device_type = lambda: "cuda"
"""


def test_ezpz_new_api_gets_backend_and_timeout(hw, monkeypatch):
    hw.xpu = hw.xccl = True
    install(hw, "ezpz", EZPZ_NEW)
    pbs_rank(monkeypatch, rank=3, world=8, local=3)
    assert initialize.setup_distributed("ccl", 45) == (3, 8, 3, "xpu", "xccl")
    import ezpz
    assert ezpz.calls == [{"framework": "ddp", "backend": "xccl", "timeout": 2700, "env": "xccl"}]
    assert hw.pg["timeout"] == datetime.timedelta(minutes=45)
    assert [e for e in hw.events if isinstance(e, tuple)] == [("init_process_group", "xccl")]  # ezpz did it once


def test_ezpz_old_api_reads_torch_backend(hw, monkeypatch):
    hw.cuda = True
    install(hw, "ezpz", EZPZ_OLD)
    assert initialize.setup_distributed("gloo", 2) == (0, 2, 0, "cuda", "gloo")
    import ezpz
    assert ezpz.calls == [{"backend": "DDP", "timeout": 120, "env": "gloo"}]


def test_ezpz_that_ignores_the_backend_is_refused(hw, monkeypatch):
    hw.cuda = True
    install(hw, "ezpz", EZPZ_OLD.replace('os.environ.get("TORCH_BACKEND", "gloo")', '"gloo"'))
    with pytest.raises(initialize.DeviceSetupError, match="ezpz started the process group with gloo, not nccl"):
        initialize.setup_distributed("nccl", 2)


@pytest.mark.parametrize("ezpz_body", [None, "VERSION = 'an unrelated PyPI package'", EZPZ_NEW])
def test_builtin_path_without_usable_ezpz(hw, monkeypatch, ezpz_body):
    if ezpz_body is not None:
        install(hw, "ezpz", ezpz_body)
    if ezpz_body == EZPZ_NEW:
        monkeypatch.setenv("MEGATRON_NO_EZPZ", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1"), monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert initialize.setup_distributed(None, 10) == (1, 2, 1, "cpu", "gloo")
    assert hw.pg["rank"] == 1 and hw.pg["init_method"] == "env://"
    if ezpz_body == EZPZ_NEW:
        import ezpz
        assert ezpz.calls == []


# ------------------------------------------------------------------------------------------------
# rank / world size / local rank from every launcher (table), and the inconsistent combinations
# ------------------------------------------------------------------------------------------------
LAUNCH_CASES = [
    # (name, env, (rank, world, local, source))
    ("single", {}, (0, 1, 0, "single process")),
    ("torchrun", {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, (5, 8, 1, "torchrun")),
    ("torchrun-no-local", {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, (5, 8, 1, "torchrun")),
    ("pals", {"PMI_RANK": "13", "PMI_SIZE": "24", "PALS_LOCAL_RANKID": "1", "PALS_LOCAL_SIZE": "12"},
     (13, 24, 1, "MPICH/PALS")),
    ("hydra", {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
     (3, 4, 1, "MPICH/PALS")),
    ("pmi-size-only", {"PMI_RANK": "5", "PMI_SIZE": "8", "PALS_LOCAL_SIZE": "4"}, (5, 8, 1, "MPICH/PALS")),
    ("openmpi", {"OMPI_COMM_WORLD_RANK": "7", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                 "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, (7, 8, 3, "Open MPI")),
    ("slurm", {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"},
     (9, 16, 1, "SLURM")),
    ("slurm-tasks-format", {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                            "SLURM_NTASKS_PER_NODE": "4(x4)"}, (9, 16, 1, "SLURM")),
    # srun launches torchrun, one per node: torchrun's own variables win
    ("torchrun-under-srun", {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "RANK": "6",
                             "WORLD_SIZE": "8", "LOCAL_RANK": "2"}, (6, 8, 2, "torchrun")),
    # an salloc shell: SLURM_NTASKS without a rank is not a launch
    ("salloc-shell", {"SLURM_NTASKS": "8"}, (0, 1, 0, "single process")),
    ("mpiexec-matching-world-size", {"PMI_RANK": "1", "PMI_SIZE": "2", "WORLD_SIZE": "2"}, (1, 2, 1, "MPICH/PALS")),
    ("world-size-1", {"WORLD_SIZE": "1"}, (0, 1, 0, "single process")),
]


@pytest.mark.parametrize("name,env,want", LAUNCH_CASES, ids=[c[0] for c in LAUNCH_CASES])
def test_launch_env_table(name, env, want):
    e = launch_env(env, use_mpi=False)
    assert (e.rank, e.world_size, e.local_rank, e.source) == want
    assert world_size_from_env(env) == want[1]


BAD_CASES = [
    ("rank-without-size", {"PMI_RANK": "1"}, "PMI_RANK is set but PMI_SIZE is not"),
    ("torch-rank-without-size", {"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ("rank-beyond-world", {"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 is not below WORLD_SIZE=4"),
    ("stale-world-size", {"PMI_RANK": "3", "PMI_SIZE": "4", "WORLD_SIZE": "2"},
     "WORLD_SIZE=2 disagrees with PMI_SIZE=4 from MPICH/PALS"),
    ("world-size-without-launcher", {"WORLD_SIZE": "4"}, "WORLD_SIZE=4 is set but no launcher set a rank"),
    ("local-beyond-node", {"PMI_RANK": "13", "PMI_SIZE": "24", "PALS_LOCAL_RANKID": "12", "PALS_LOCAL_SIZE": "12"},
     "PALS_LOCAL_RANKID=12 is inconsistent with PMI_RANK=13 and PALS_LOCAL_SIZE=12"),
    ("local-above-rank", {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "LOCAL_RANK=3 is inconsistent"),
    ("not-a-number", {"OMPI_COMM_WORLD_RANK": "one", "OMPI_COMM_WORLD_SIZE": "2"},
     "OMPI_COMM_WORLD_RANK='one' is not a whole number"),
]


@pytest.mark.parametrize("name,env,match", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_launch_env_inconsistent_is_a_clear_error(name, env, match):
    with pytest.raises(LaunchEnvError, match=match):
        launch_env(env, use_mpi=False)


class FakeComm:
    def __init__(self, rank, size, local):
        self.rank, self.size, self.local = rank, size, local

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, kind):
        return FakeComm(self.local, 0, 0)


def fake_mpi4py(monkeypatch, rank, size, local):
    MPI = types.SimpleNamespace(COMM_WORLD=FakeComm(rank, size, local), COMM_TYPE_SHARED=1)
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=MPI))


def test_mpi4py_when_the_launcher_sets_no_variables(monkeypatch):
    fake_mpi4py(monkeypatch, 5, 6, 2)
    e = launch_env({})
    assert (e.rank, e.world_size, e.local_rank, e.source) == (5, 6, 2, "mpi4py")
    fake_mpi4py(monkeypatch, 0, 1, 0)  # a lone process under MPI: single process
    assert launch_env({}).source == "single process"
    with pytest.raises(LaunchEnvError, match="WORLD_SIZE=3 is set but no launcher"):
        launch_env({"WORLD_SIZE": "3"})


def test_initialize_megatron_turns_start_up_errors_into_argument_errors(hw, monkeypatch):
    from megatron.arguments import ArgumentError

    monkeypatch.setenv("PMI_RANK", "0")  # PMI_SIZE missing
    args = default_args(distributed_backend=None, distributed_timeout_minutes=10, bf16=False,
                                 world_size=1)
    with pytest.raises(ArgumentError, match="PMI_RANK is set but PMI_SIZE is not"):
        initialize.initialize_megatron(args)


def test_single_process_store_binds_its_own_port():
    """One process without MASTER_ADDR/PORT: the store listens on a port the system picks as it binds, so a
    port taken by another process between "found free" and "bound" cannot fail the start (EADDRINUSE, seen
    with two single-process runs started at once). Here the old way's free port is made busy: the set-up
    still works, on another port, which MASTER_PORT names."""
    import subprocess  # noqa: PLC0415

    code = textwrap.dedent("""
        import os, socket
        import torch.distributed as dist
        from megatron import initialize
        busy = socket.socket(); busy.bind(("127.0.0.1", 0)); busy.listen()
        initialize.free_port = lambda: busy.getsockname()[1]  # what a race would hand out
        rank, world, local, dev = initialize._setup_torch_builtin("gloo", 1, "cpu")
        port = int(os.environ["MASTER_PORT"])
        assert (rank, world, dist.get_world_size()) == (0, 1, 1) and os.environ["MASTER_ADDR"] == "127.0.0.1"
        assert port != busy.getsockname()[1]
        probe = socket.create_connection(("127.0.0.1", port))  # the store listens there
        probe.close()
        dist.all_reduce(__import__("torch").ones(1))
        print("ok", port)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stderr[-2000:]


def test_ports_are_chosen_below_the_ephemeral_range():
    """launch_env.free_port (MASTER_PORT where nobody gave one: the trainer's multi-rank start under mpiexec,
    the launcher's one-node runs, the tests and benchmarks): a port outside the range outgoing connections
    take their local ports from, free when chosen, and not the same twice in a row by construction of a
    random pick (the system's port-0 pick came from that range and was taken by another process's
    connection before torchrun bound it: EADDRINUSE in a one-core suite run)."""
    import socket

    from megatron.launch_env import ephemeral_port_range, free_port

    low, _ = ephemeral_port_range()
    ports = [free_port() for _ in range(20)]
    if low > 11000:
        assert all(10000 <= p < low for p in ports), ports
    assert len(set(ports)) > 15  # random picks, not one port handed to every caller
    with socket.socket() as s:  # free: it can be bound
        s.bind(("127.0.0.1", ports[-1]))


def test_mpi_ranks_share_a_port_below_the_ephemeral_range(monkeypatch):
    """Ranks started by mpiexec without MASTER_PORT: rank 0 picks the port with launch_env.free_port and
    MPI broadcasts it (a fake mpi4py here records the broadcast); no port from the ephemeral range."""
    from megatron.launch_env import ephemeral_port_range

    sent = []

    class Comm:
        @staticmethod
        def bcast(obj, root):
            sent.append((obj, root))
            return obj

    fake = types.ModuleType("mpi4py")
    fake.MPI = types.SimpleNamespace(COMM_WORLD=Comm())
    monkeypatch.setitem(sys.modules, "mpi4py", fake)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # set first so that the test's end restores them
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    initialize._share_master_address(0, 2)
    (addr, port), root = sent[0]
    assert root == 0 and os.environ["MASTER_PORT"] == port and os.environ["MASTER_ADDR"] == addr
    low, _ = ephemeral_port_range()
    if low > 11000:
        assert 10000 <= int(port) < low
