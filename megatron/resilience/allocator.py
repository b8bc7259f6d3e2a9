"""glibc malloc's mmap threshold (`--malloc-mmap-threshold`): freed tensors leave the process.

Resident memory is what the C allocator holds, not what torch has live. glibc serves an allocation
above its mmap threshold with its own mapping, returned to the system on free; below it, from its
heaps, which keep freed memory. The threshold starts at 128 KiB and rises to the size of every
mapped block freed (up to 32 MiB on 64-bit), so after the first step nearly every gradient,
activation and bucket of a large model comes from the heaps, and their freed, fragmented memory
stays resident: on bench/memory.py's 134M-parameter model about 0.2-0.45 GiB of a rank's peak
(bench/README.md). A fixed threshold (glibc's `mallopt(M_MMAP_THRESHOLD)`, what the environment
variable `MALLOC_MMAP_THRESHOLD_` sets at process start) turns the rise off.

`--allocator mimalloc` replaces glibc's malloc with mimalloc (the `cmeel-mimalloc` wheel's library),
which returns freed memory to the system itself: on bench/memory.py's model, ZeRO-3 1.78 -> 1.52 GiB
per rank for less CPU per step (ALCF/notes/performance.md). A malloc is chosen when the process starts
(the dynamic loader's LD_PRELOAD), so pretrain_gpt.py re-executes itself with the library preloaded
(`start_with`: same pid, arguments and environment), with mimalloc's transparent huge pages off
(`MIMALLOC_ALLOW_THP=0`, unless set: with them the engine's construction cost three times the CPU).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
ENV = "MALLOC_MMAP_THRESHOLD_"


def set_mmap_threshold(nbytes: int) -> str:
    """Fix glibc's mmap threshold at `nbytes` (0: leave glibc's rising default). Returns what was done,
    for the log: the environment variable wins (glibc read it at start), and a C library without
    `mallopt` (not glibc) is left as it is."""
    if nbytes <= 0:
        return "glibc default (rising mmap threshold)"
    if os.environ.get(ENV):
        return f"{ENV}={os.environ[ENV]} from the environment"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not glibc: unchanged"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, int(nbytes)) != 1:
        return f"mallopt refused {nbytes}: unchanged"
    return f"mmap threshold {nbytes} bytes (allocations at least that large are returned to the system on free)"


MIMALLOC_DIST = "cmeel-mimalloc"  # the wheel that ships libmimalloc.so
REEXEC_MARK = "MEGATRON_ALLOCATOR_REEXEC"  # set in the re-executed process: never loop


def requested_allocator(argv: list[str]) -> str:
    """The value of the last `--allocator` in `argv` ("glibc" without one), before argparse runs."""
    name = "glibc"
    for i, arg in enumerate(argv):
        if arg == "--allocator" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--allocator="):
            name = arg.split("=", 1)[1]
    return name


def mimalloc_library() -> str | None:
    """The path of the installed `cmeel-mimalloc` wheel's libmimalloc.so, or None."""
    import importlib.metadata  # noqa: PLC0415  (60 ms: only when --allocator mimalloc is asked for)

    try:
        files = importlib.metadata.files(MIMALLOC_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f for f in files if f.name == "libmimalloc.so"]
    return str(found[0].locate()) if found else None


def active_allocator() -> str:
    """"mimalloc" when this process has libmimalloc mapped (it was preloaded), else "glibc"."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "glibc"
    return "mimalloc" if "/libmimalloc.so" in maps else "glibc"


def start_with(argv: list[str]) -> None:
    """pretrain_gpt.py's first step: with `--allocator mimalloc` in `argv` (this process's command line)
    and the library installed but not loaded, replace this process by the same command with the library
    preloaded (`os.execve`: same pid, so torchrun and mpiexec keep tracking it). Returns otherwise;
    argument validation then refuses what cannot run (library missing, not preloaded)."""
    if requested_allocator(argv) != "mimalloc" or active_allocator() == "mimalloc" or os.environ.get(REEXEC_MARK):
        return
    lib = mimalloc_library()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    env.setdefault("MIMALLOC_ALLOW_THP", "0")
    env[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, _own_command(), env)


def _own_command() -> list[str]:
    """This process's command: `python [interpreter flags] script args` as it was started, or, where sys.argv
    was set by the process this one was forked from (the tests' warm interpreter), python and sys.argv."""
    orig = sys.orig_argv
    if len(orig) > len(sys.argv) and orig[len(orig) - len(sys.argv):] == sys.argv:
        return [sys.executable, *orig[1:]]
    return [sys.executable, *sys.argv]


def allocator_problems(allocator: str, mmap_threshold: int, check_only: bool) -> list[str]:
    """What stops `--allocator` from doing what it says (one line each, naming the fix)."""
    if allocator != "mimalloc":
        return []
    lib = mimalloc_library()
    if lib is None:
        return [f"--allocator mimalloc: the library is not installed: pip install {MIMALLOC_DIST} "
                "(or drop --allocator)"]
    problems = []
    if mmap_threshold:
        problems.append(f"--malloc-mmap-threshold {mmap_threshold} sets glibc's malloc, which --allocator "
                        "mimalloc replaces: drop one of the two")
    if not check_only and active_allocator() != "mimalloc":
        problems.append("--allocator mimalloc: this process was started without it; run pretrain_gpt.py as a "
                        "program (it re-executes itself with the library preloaded) or start Python with "
                        f"LD_PRELOAD={lib}")
    return problems


def allocator_setting(allocator: str, mmap_threshold: int) -> str:
    """The start-up table's "C allocator" value; applies `--malloc-mmap-threshold` under glibc."""
    if allocator == "mimalloc":
        return ("mimalloc (libmimalloc.so preloaded; transparent huge pages "
                f"{'off' if os.environ.get('MIMALLOC_ALLOW_THP') == '0' else 'allowed'})")
    return set_mmap_threshold(mmap_threshold)
