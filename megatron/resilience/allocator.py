"""glibc malloc's mmap threshold (`--malloc-mmap-threshold`): freed tensors leave the process.

Resident memory is what the C allocator holds, not what torch has live. glibc serves an allocation
above its mmap threshold with its own mapping, returned to the system on free; below it, from its
heaps, which keep freed memory. The threshold starts at 128 KiB and rises to the size of every
mapped block freed (up to 32 MiB on 64-bit), so after the first step nearly every gradient,
activation and bucket of a large model comes from the heaps, and their freed, fragmented memory
stays resident: on bench/memory.py's 134M-parameter model about 0.2-0.45 GiB of a rank's peak
(bench/README.md). A fixed threshold (glibc's `mallopt(M_MMAP_THRESHOLD)`, what the environment
variable `MALLOC_MMAP_THRESHOLD_` sets at process start) turns the rise off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

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
