"""Distributed set-up: ranks from any launcher, device and backend from the hardware, seeds.

Uses `ezpz.setup_torch()` when ezpz is importable (as upstream does); otherwise does the same
job itself:

* rank / world size / local rank from the first variable set among torchrun's (`RANK`...),
  MPICH/PALS (`PMI_RANK`, `PALS_LOCAL_RANKID`, `MPI_LOCALRANKID`...), Open MPI
  (`OMPI_COMM_WORLD_*`) and SLURM (`SLURM_PROCID`...), then mpi4py, then a single process;
* `MASTER_ADDR`/`MASTER_PORT`: used when set; otherwise rank 0 picks its host name and a free
  port and shares them through mpi4py (127.0.0.1 on a single host);
* device and backend: XPU -> xccl (or ccl with oneCCL bindings), CUDA -> nccl, CPU -> gloo;
  the local device is selected before the process group is created;
* then DeepSpeed adopts the process group, and the Megatron TP/PP/DP groups are built.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel

log = logging.getLogger(__name__)

RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS")
LOCAL_RANK_VARS = ("LOCAL_RANK", "PALS_LOCAL_RANKID", "PMIX_LOCAL_RANK", "PMI_LOCAL_RANK",
                   "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MPICH_LOCALRANKID", "SLURM_LOCALID")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "PALS_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                   "SLURM_NTASKS_PER_NODE")


def _first_env(names, env) -> str | None:
    for n in names:
        if env.get(n) not in (None, ""):
            return env[n]
    return None


def dist_env(env=os.environ) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as the launcher described them; (0, 1, 0) when alone."""
    rank, world, local = (_first_env(v, env) for v in (RANK_VARS, WORLD_VARS, LOCAL_RANK_VARS))
    if rank is None and world is None:
        try:  # launched by an MPI that sets none of the variables above
            from mpi4py import MPI  # noqa: PLC0415

            comm = MPI.COMM_WORLD
            rank, world = str(comm.Get_rank()), str(comm.Get_size())
        except ImportError:
            rank, world = "0", "1"
    rank_i, world_i = int(rank or 0), int(world or 1)
    if local is None:
        per_node = int(_first_env(LOCAL_SIZE_VARS, env) or world_i)
        local = str(rank_i % max(per_node, 1))
    return rank_i, world_i, int(local)


def device_type() -> str:
    """xpu > cuda > cpu, overridable with TORCH_DEVICE."""
    forced = os.environ.get("TORCH_DEVICE")
    if forced:
        return forced
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def default_backend(device: str) -> str:
    if device == "cuda":
        return "nccl"
    if device == "xpu":
        if getattr(dist, "is_xccl_available", lambda: False)():
            return "xccl"
        try:  # oneCCL bindings register the "ccl" backend on import
            import oneccl_bindings_for_pytorch  # noqa: F401, PLC0415

            return "ccl"
        except ImportError:
            log.warning("XPU found but neither xccl nor oneCCL bindings are available; using gloo")
    return "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _share_master_address(rank: int, world: int) -> None:
    """Make MASTER_ADDR/PORT known on every rank (rank 0 decides, mpi4py broadcasts)."""
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        return
    try:
        from mpi4py import MPI  # noqa: PLC0415
    except ImportError as e:
        raise RuntimeError("MASTER_ADDR/MASTER_PORT are not set and mpi4py is not installed to share them: "
                           "export MASTER_ADDR and MASTER_PORT, or install mpi4py") from e
    addr = port = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostname()
        port = os.environ.get("MASTER_PORT") or str(_free_port())
    addr, port = MPI.COMM_WORLD.bcast((addr, port), root=0)
    if addr is None or port is None:
        raise RuntimeError("could not share MASTER_ADDR/PORT through MPI (is mpi4py built for this MPI?)")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port


def _setup_torch_builtin(backend: str | None, timeout_minutes: int) -> tuple[int, int, int, str]:
    rank, world, local = dist_env()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    dev = device_type()
    if dev == "cuda":
        torch.cuda.set_device(local)
    elif dev == "xpu":
        torch.xpu.set_device(local)  # before the process group: load-bearing on XPU
    backend = backend or default_backend(dev)
    _share_master_address(rank, world)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world, local, dev


def _setup_torch_ezpz() -> tuple[int, int, int, str] | None:
    if os.environ.get("MEGATRON_NO_EZPZ"):
        return None
    try:
        import ezpz  # noqa: PLC0415

        setup = ezpz.setup_torch
    except (ImportError, AttributeError):  # PyPI's "ezpz" is an unrelated package without setup_torch
        return None
    rank = setup()
    return rank, ezpz.get_world_size(), ezpz.get_local_rank(), ezpz.get_torch_device_type()


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def initialize_megatron(args) -> parallel_state.ParallelState:
    """Process group, DeepSpeed's communication layer, Megatron groups; fills args.rank/local_rank/device."""
    if device_type() == "cpu":  # DeepSpeed would find the same, with a warning that alarms users
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    got = _setup_torch_ezpz()
    if got is None:
        got = _setup_torch_builtin(args.distributed_backend, args.distributed_timeout_minutes)
    args.rank, world, args.local_rank, args.device_type = got
    if world != args.world_size:
        raise RuntimeError(f"the launcher started {world} processes but WORLD_SIZE said {args.world_size}")
    import deepspeed  # noqa: PLC0415  (heavy import; after argument checks)

    timeout = datetime.timedelta(minutes=args.distributed_timeout_minutes)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, timeout=timeout)
    state = parallel_state.initialize_model_parallel(args.tensor_model_parallel_size,
                                                     args.pipeline_model_parallel_size,
                                                     getattr(args, "ds_sequence_parallel_size", 1) or 1,
                                                     timeout=timeout)  # TP/DP/PP groups: same timeout
    set_seeds(args.seed)
    tensor_parallel.model_parallel_manual_seed(args.seed)  # TP-rank RNG for dropout on split activations
    return state
