"""Rank, world size and local rank from the launcher's environment variables (no torch import).

Each launcher sets one family of variables; the innermost launcher wins (torchrun is always the
innermost when it runs under srun or mpiexec, so its family comes first):

==============  =====================  ======================  ==============================  ==========================
family          rank                   world size              local rank                      processes on this node
==============  =====================  ======================  ==============================  ==========================
torchrun        RANK                   WORLD_SIZE              LOCAL_RANK                      LOCAL_WORLD_SIZE
MPICH / PALS    PMI_RANK               PMI_SIZE                PALS_LOCAL_RANKID,              PALS_LOCAL_SIZE,
                                                               MPI_LOCALRANKID, PMI_LOCAL_RANK MPI_LOCALNRANKS
Open MPI        OMPI_COMM_WORLD_RANK   OMPI_COMM_WORLD_SIZE    OMPI_COMM_WORLD_LOCAL_RANK      OMPI_COMM_WORLD_LOCAL_SIZE
SLURM (srun)    SLURM_PROCID           SLURM_NTASKS            SLURM_LOCALID                   SLURM_NTASKS_PER_NODE
==============  =====================  ======================  ==============================  ==========================

A family's variables are never mixed with another's. Combinations that would make the
process group hang or fail later (a rank without its world size, rank >= world size, a stale
`WORLD_SIZE` that disagrees with the MPI launcher's count, `WORLD_SIZE > 1` with no rank at all)
raise `LaunchEnvError` naming the variables and the fix.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass


class LaunchEnvError(RuntimeError):
    """The launcher's variables are inconsistent; the message names them and the fix."""


@dataclass(frozen=True)
class Family:
    name: str
    rank: str
    size: str
    local_rank: tuple[str, ...]
    local_size: tuple[str, ...]


FAMILIES = (
    Family("torchrun", "RANK", "WORLD_SIZE", ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE",)),
    Family("MPICH/PALS", "PMI_RANK", "PMI_SIZE",
           ("PALS_LOCAL_RANKID", "MPI_LOCALRANKID", "MPICH_LOCALRANKID", "PMI_LOCAL_RANK", "PMIX_LOCAL_RANK"),
           ("PALS_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")),
    Family("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",),
           ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    Family("SLURM", "SLURM_PROCID", "SLURM_NTASKS", ("SLURM_LOCALID",), ("SLURM_NTASKS_PER_NODE",)),
)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    source: str  # the family the values came from ("torchrun", ..., "mpi4py", "single process")


def _get(env, name: str) -> str | None:
    v = env.get(name)
    return None if v in (None, "") else v


def _int(env, name: str) -> int:
    v = env[name]
    try:
        n = int(v)
    except ValueError:
        raise LaunchEnvError(f"{name}={v!r} is not a whole number; the launcher sets it, do not export it by hand"
                             ) from None
    if n < 0:
        raise LaunchEnvError(f"{name}={v} is negative; the launcher sets it, do not export it by hand")
    return n


def _first(env, names) -> str | None:
    return next((n for n in names if _get(env, n) is not None), None)


def world_size_from_env(env=os.environ) -> int:
    """The world size the launcher announced (no checks, no MPI): for argument validation."""
    fam = next((f for f in FAMILIES if _get(env, f.rank) is not None and _get(env, f.size) is not None), None)
    name = fam.size if fam else "WORLD_SIZE"
    try:
        return int(env.get(name) or 1)
    except ValueError:
        return 1


def _from_mpi4py() -> LaunchEnv | None:
    try:
        from mpi4py import MPI  # noqa: PLC0415
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    rank, world = int(comm.Get_rank()), int(comm.Get_size())
    local = rank
    if world > 1 and hasattr(comm, "Split_type"):  # ranks sharing this node
        local = int(comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank())
    return LaunchEnv(rank, world, local, "mpi4py")


def launch_env(env=os.environ, use_mpi: bool = True) -> LaunchEnv:
    """(rank, world size, local rank) as the launcher described them; single process when alone."""
    fam = next((f for f in FAMILIES if _get(env, f.rank) is not None), None)
    if fam is None:
        got = _from_mpi4py() if use_mpi else None
        if got is not None and got.world_size > 1:
            return got
        if _get(env, "WORLD_SIZE") is not None and _int(env, "WORLD_SIZE") > 1:
            raise LaunchEnvError(
                f"WORLD_SIZE={env['WORLD_SIZE']} is set but no launcher set a rank (RANK, PMI_RANK, "
                "OMPI_COMM_WORLD_RANK, SLURM_PROCID): start the trainer with torchrun, mpiexec or srun "
                "(bash train_alcf.sh does), or unset WORLD_SIZE for a single process")
        return LaunchEnv(0, 1, 0, "single process")
    if _get(env, fam.size) is None:
        raise LaunchEnvError(f"{fam.rank} is set but {fam.size} is not ({fam.name} sets both): launch with "
                             f"{fam.name} itself, or unset {fam.rank}")
    rank, world = _int(env, fam.rank), _int(env, fam.size)
    if world < 1 or rank >= world:
        raise LaunchEnvError(f"{fam.rank}={rank} is not below {fam.size}={world} ({fam.name}): the variables come "
                             "from different launches; unset the stale ones")
    if fam.name != "torchrun" and _get(env, "WORLD_SIZE") is not None and _int(env, "WORLD_SIZE") != world:
        raise LaunchEnvError(
            f"WORLD_SIZE={env['WORLD_SIZE']} disagrees with {fam.size}={world} from {fam.name}: the processes "
            f"would wait for ranks that never start; unset WORLD_SIZE or launch {env['WORLD_SIZE']} processes")
    local_size = None
    ls_name = _first(env, fam.local_size)
    if ls_name is not None:
        try:
            local_size = int(env[ls_name])
        except ValueError:  # SLURM may write "4(x2)"; the local rank is still known
            local_size = None
    lr_name = _first(env, fam.local_rank)
    if lr_name is not None:
        local = _int(env, lr_name)
        if local > rank or (local_size is not None and local >= local_size):
            raise LaunchEnvError(f"{lr_name}={local} is inconsistent with {fam.rank}={rank}"
                                 f"{f' and {ls_name}={local_size}' if local_size is not None else ''} "
                                 f"({fam.name}): unset the stale variables")
    else:
        local = rank % local_size if local_size else rank % world
    return LaunchEnv(rank, world, local, fam.name)


def ephemeral_port_range() -> tuple[int, int]:
    """The range the system takes outgoing connections' local ports from (Linux's default otherwise)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "") -> int:
    """A free TCP port for a rendezvous store that another process binds later (MASTER_PORT), chosen at
    random below the system's ephemeral range. A port the system picks (binding port 0) comes from that
    range, where any process's outgoing connection (gloo opens many) can take it before the store binds
    it: EADDRINUSE at start-up. Below the range only another caller's random choice can collide. `host`
    is where the store will listen ("" = every interface, as the store binds). Falls back to the system's
    pick where the range starts too low to leave room."""
    low, _ = ephemeral_port_range()
    rng = random.SystemRandom()
    for _ in range(100 if low > 11000 else 0):
        port = rng.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:  # in use (a service, another run's store, a closing connection)
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
