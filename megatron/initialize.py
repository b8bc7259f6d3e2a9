"""Distributed set-up: ranks from any launcher, device and backend from the hardware, seeds.

Uses `ezpz.setup_torch()` when ezpz is importable (as upstream does), handing it the backend and
the timeout chosen here; otherwise does the same job itself:

* rank / world size / local rank from the launcher's variables (megatron/launch_env.py: torchrun,
  MPICH/PALS, Open MPI, SLURM, then mpi4py, then a single process; inconsistent ones are an error);
* `MASTER_ADDR`/`MASTER_PORT`: used when set; otherwise rank 0 picks its host name and a free
  port and shares them through mpi4py; a single process listens on 127.0.0.1 at a port the system
  picks as the store binds it (and sets both variables to it);
* device: TORCH_DEVICE if set, else xpu > cuda > cpu. intel_extension_for_pytorch (when installed)
  is imported *before* asking `torch.xpu.is_available()`: on the frameworks modules that ship it,
  XPU may register only on that import;
* backend: `--distributed-backend` (the launcher's BE/CCL/NCCL) if given, else xpu -> xccl (torch's
  own oneCCL backend) or ccl (oneccl_bindings_for_pytorch, older torch), cuda -> nccl, cpu -> gloo;
  a backend that cannot work on the device is refused with the fix, never replaced by gloo;
* the local device (index = local rank) is selected before the process group is created;
* then DeepSpeed adopts the process group, and the Megatron TP/PP/DP groups are built.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import inspect
import logging
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.launch_env import LaunchEnvError, free_port, launch_env

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "xpu")


class DeviceSetupError(RuntimeError):
    """The device / backend / precision asked for cannot work here; the message names the fix."""


def dist_env(env=os.environ) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as the launcher described them; (0, 1, 0) when alone."""
    e = launch_env(env)
    return e.rank, e.world_size, e.local_rank


def _import_xpu_extensions() -> None:
    """Import IPEX when it is installed: it registers the XPU device on older frameworks modules."""
    if importlib.util.find_spec("intel_extension_for_pytorch") is None:
        return
    try:
        importlib.import_module("intel_extension_for_pytorch")
    except Exception as e:  # noqa: BLE001  (a broken install raises anything from OSError to RuntimeError)
        raise DeviceSetupError(
            f"intel_extension_for_pytorch is installed but does not import ({type(e).__name__}: {e}); load the "
            "frameworks module it was built for, or uninstall it (torch >= 2.5 has XPU support built in)") from e


def _xpu_available() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def device_type() -> str:
    """xpu > cuda > cpu, overridable with TORCH_DEVICE (IPEX imported first when installed)."""
    forced = os.environ.get("TORCH_DEVICE")
    if forced:
        forced = forced.split(":", 1)[0].lower()
        if forced not in DEVICES:
            raise DeviceSetupError(f"TORCH_DEVICE={os.environ['TORCH_DEVICE']} is not one of {', '.join(DEVICES)}; "
                                   "unset it to pick the device from the hardware")
        if forced == "xpu":
            _import_xpu_extensions()
        return forced
    _import_xpu_extensions()
    if _xpu_available():
        return "xpu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _xccl_available() -> bool:
    return bool(getattr(dist, "is_xccl_available", lambda: False)())


def _ccl_bindings() -> bool:
    """Import oneccl_bindings_for_pytorch (it registers the "ccl" backend on import)."""
    if importlib.util.find_spec("oneccl_bindings_for_pytorch") is None:
        return False
    importlib.import_module("oneccl_bindings_for_pytorch")
    return True


def default_backend(device: str) -> str:
    return resolve_backend(None, device)


def resolve_backend(requested: str | None, device: str) -> str:
    """The process-group backend for `device`: the one asked for, or the device's own."""
    if requested is None:
        if device == "cuda":
            return "nccl"
        if device != "xpu":
            return "gloo"
        if _xccl_available():
            return "xccl"
        if _ccl_bindings():
            return "ccl"
        raise DeviceSetupError("XPU found but torch has no xccl backend and oneccl_bindings_for_pytorch is not "
                               "installed: use torch >= 2.8 with XPU support, or load a frameworks module that "
                               "ships the oneCCL bindings")
    if requested == "ccl":
        if _ccl_bindings():
            return "ccl"
        if device == "xpu" and _xccl_available():
            # the same oneCCL library, reached through torch's own backend (bindings absent in new modules)
            log.info("backend: ccl asked for; oneccl_bindings_for_pytorch is not installed, using torch's xccl "
                     "(the same oneCCL library)")
            return "xccl"
        raise DeviceSetupError("--distributed-backend ccl (BE=ccl) needs oneccl_bindings_for_pytorch, which is not "
                               "installed: load the frameworks module that ships it, or set BE=xccl (torch >= 2.8 "
                               f"with XPU) or BE=gloo (device {device})")
    if requested == "xccl" and not (device == "xpu" and _xccl_available()):
        raise DeviceSetupError(f"--distributed-backend xccl needs an XPU and a torch with xccl (device {device}, "
                               f"xccl {'available' if _xccl_available() else 'absent'}); set BE=gloo on CPU or "
                               "BE=ccl with the oneCCL bindings")
    if requested == "nccl" and device != "cuda":
        own = {"cpu": "gloo", "xpu": "xccl or ccl"}.get(device, "its own")
        raise DeviceSetupError(f"--distributed-backend nccl needs CUDA GPUs, but the device is {device}; "
                               f"unset BE/NCCL to use the device's backend ({own})")
    return requested


def precision_problem(device: str, bf16: bool) -> str | None:
    """bf16 on a device that cannot run it, as one line naming the fix (None when fine).

    fp16 runs on every CUDA GPU and XPU (whether the trainer accepts --fp16 is megatron/arguments.py's call).
    """
    if device == "cuda" and bf16 and not torch.cuda.is_bf16_supported():
        return ("--bf16 on a GPU without bf16 support (compute capability < 8.0): set DTYPE=fp32 "
                "(drop --bf16)")
    if device == "xpu" and bf16 and hasattr(torch.xpu, "is_bf16_supported") and not torch.xpu.is_bf16_supported():
        return "--bf16 on an XPU without bf16 support: set DTYPE=fp32 (drop --bf16)"
    return None


def _share_master_address(rank: int, world: int) -> None:
    """Make MASTER_ADDR/PORT known on every rank (rank 0 decides, mpi4py broadcasts)."""
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return
    try:
        from mpi4py import MPI  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError("MASTER_ADDR/MASTER_PORT are not set and mpi4py is not installed to share them: "
                           "export MASTER_ADDR and MASTER_PORT, or install mpi4py") from e
    addr = port = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostname()
        port = os.environ.get("MASTER_PORT") or str(free_port())
    addr, port = MPI.COMM_WORLD.bcast((addr, port), root=0)
    if addr is None or port is None:
        raise RuntimeError("could not share MASTER_ADDR/PORT through MPI (is mpi4py built for this MPI?)")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port


def _set_device(dev: str, local: int) -> None:
    if dev == "cuda":
        torch.cuda.set_device(local)
    elif dev == "xpu":
        torch.xpu.set_device(local)  # before the process group: load-bearing on XPU


def _setup_torch_builtin(backend: str, timeout_minutes: float, dev: str) -> tuple[int, int, int, str]:
    rank, world, local = dist_env()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    _set_device(dev, local)
    if dist.is_initialized():
        return rank, world, local, dev
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if world == 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        # One process and no address given: its store listens on a port the system picks as it binds. A port
        # found free first and bound later can be taken in between by another process (EADDRINUSE, seen with
        # two single-process runs started at once); MASTER_ADDR/PORT then name the store, as under env://.
        store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timeout)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(store.port)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        return rank, world, local, dev
    _share_master_address(rank, world)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
    return rank, world, local, dev


def _ezpz():
    """The ezpz module when it is the ALCF one (PyPI's "ezpz" is an unrelated package without setup_torch)."""
    if os.environ.get("MEGATRON_NO_EZPZ"):
        return None
    try:
        import ezpz  # noqa: PLC0415
    except ImportError:
        return None
    return ezpz if callable(getattr(ezpz, "setup_torch", None)) else None


def _setup_torch_ezpz(ezpz, backend: str, timeout_minutes: float) -> tuple[int, int, int, str]:
    """ezpz.setup_torch with this run's backend and timeout (its timeout is in seconds).

    Newer ezpz takes `framework=` and the torch backend as `backend=`; older ones take the framework
    as `backend=` and read the torch backend from TORCH_BACKEND, which is set for both.
    """
    os.environ["TORCH_BACKEND"] = backend
    params = inspect.signature(ezpz.setup_torch).parameters
    kwargs = {"timeout": int(round(timeout_minutes * 60))}
    if "framework" in params:
        kwargs.update(framework="ddp", backend=backend)
    else:
        kwargs["backend"] = "DDP"
    rank = int(ezpz.setup_torch(**kwargs))
    world, local = int(ezpz.get_world_size()), int(ezpz.get_local_rank())
    dev = str(ezpz.get_torch_device_type())
    if world > 1 and dist.is_initialized() and dist.get_backend() != backend:
        raise DeviceSetupError(f"ezpz started the process group with {dist.get_backend()}, not {backend} as asked; "
                               "update ezpz, or set MEGATRON_NO_EZPZ=1 to use the built-in set-up")
    return rank, world, local, dev


def setup_distributed(backend: str | None, timeout_minutes: float, *,
                      bf16: bool = False) -> tuple[int, int, int, str, str]:
    """Device, backend and the default process group: (rank, world, local_rank, device, backend).

    Raises DeviceSetupError / LaunchEnvError (one line naming the fix) before any process group starts.
    """
    dev = device_type()
    problem = precision_problem(dev, bf16)
    if problem:
        raise DeviceSetupError(problem)
    backend = resolve_backend(backend, dev)
    os.environ.setdefault("DS_ACCELERATOR", dev)  # DeepSpeed picks the same device (and no alarming warning)
    ezpz = _ezpz()
    if ezpz is not None:
        rank, world, local, dev_ezpz = _setup_torch_ezpz(ezpz, backend, timeout_minutes)
        if dev_ezpz != dev:
            raise DeviceSetupError(f"ezpz chose device {dev_ezpz} but this process found {dev}; set TORCH_DEVICE "
                                   "to the one you mean")
        if not dist.is_initialized():  # ezpz leaves a single process without a process group
            _setup_torch_builtin(backend, timeout_minutes, dev)
    else:
        rank, world, local, dev = _setup_torch_builtin(backend, timeout_minutes, dev)
    log.info("distributed: rank %d/%d, local rank %d, device %s:%d, backend %s, timeout %s min%s", rank, world,
             local, dev, local, dist.get_backend(), timeout_minutes, " (ezpz)" if ezpz is not None else "")
    return rank, world, local, dev, dist.get_backend()


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def initialize_megatron(args) -> parallel_state.ParallelState:
    """Process group, DeepSpeed's communication layer, Megatron groups; fills args.rank/local_rank/device."""
    from megatron.arguments import ArgumentError  # noqa: PLC0415

    try:
        args.rank, world, args.local_rank, args.device_type, _ = setup_distributed(
            args.distributed_backend, args.distributed_timeout_minutes, bf16=bool(args.bf16))
    except (DeviceSetupError, LaunchEnvError) as e:
        raise ArgumentError(str(e)) from e
    if world != args.world_size:
        raise RuntimeError(f"the launcher started {world} processes but WORLD_SIZE said {args.world_size}")
    from megatron.deepspeed_compat import check_version, defer_muon_compile, skip_shm_inference_op  # noqa: PLC0415

    try:
        warning = check_version()  # a DeepSpeed the overrides were not tested with is refused
    except RuntimeError as e:
        raise ArgumentError(str(e)) from e
    if warning and args.rank == 0:
        log.warning(warning)
    import deepspeed  # noqa: PLC0415  (heavy import; after argument checks)

    timeout = datetime.timedelta(minutes=args.distributed_timeout_minutes)
    skip_shm_inference_op()  # DeepSpeed would compile an op on a CPU that training never uses
    defer_muon_compile()  # and load torch.compile's machinery for an optimizer it never builds
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, timeout=timeout)
    state = parallel_state.initialize_model_parallel(args.tensor_model_parallel_size,
                                                     args.pipeline_model_parallel_size,
                                                     args.ds_sequence_parallel_size or 1,
                                                     timeout=timeout)  # TP/DP/PP groups: same timeout
    set_seeds(args.seed)
    tensor_parallel.model_parallel_manual_seed(args.seed)  # TP-rank RNG for dropout on split activations
    return state
