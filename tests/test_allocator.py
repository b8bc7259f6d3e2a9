"""megatron/resilience/allocator.py (--malloc-mmap-threshold): freed blocks leave the process.

Each case runs in a fresh interpreter (the setting is process-wide): a 16 MiB block is mapped and freed,
which raises glibc's default threshold to 16 MiB; four 8 MiB blocks are then written and three freed
below the fourth (no trim from the heap's top). With glibc's default the three stay resident (+32 MiB
over the baseline); with the threshold fixed at 1 MiB they are unmapped (+8 MiB, the live block only).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = r"""
import ctypes, os, sys
from megatron.resilience.allocator import set_mmap_threshold
print(set_mmap_threshold(int(sys.argv[1])))
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
MB = 1 << 20
p = libc.malloc(16 * MB); ctypes.memset(p, 1, 16 * MB); libc.free(p)
base = rss()
blocks = [libc.malloc(8 * MB) for _ in range(4)]
for b in blocks:
    ctypes.memset(b, 1, 8 * MB)
for b in blocks[:3]:
    libc.free(b)
print((rss() - base) / MB)
"""


def probe(threshold: int, env_extra: dict | None = None) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env.update(PYTHONPATH=ROOT, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold)], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_fixed_threshold_returns_freed_blocks():
    said, kept = probe(0)
    assert said == "glibc default (rising mmap threshold)" and 31 <= kept <= 34  # the 3 freed blocks stay
    said, kept = probe(1 << 20)
    assert said.startswith("mmap threshold 1048576 bytes") and 7 <= kept <= 10  # only the live block
    said, kept = probe(1 << 20, {"MALLOC_MMAP_THRESHOLD_": "1048576"})  # the environment's setting wins
    assert said == "MALLOC_MMAP_THRESHOLD_=1048576 from the environment" and 7 <= kept <= 10


def test_negative_threshold_is_refused():
    from megatron.arguments import ArgumentError, parse_args
    from distributed import TINY_MODEL

    with pytest.raises(ArgumentError, match=r"--malloc-mmap-threshold must be >= 0 bytes \(got -1\)"):
        parse_args([*TINY_MODEL, "--lr", "1e-3", "--train-iters", "3", "--data-path", "x",
                    "--malloc-mmap-threshold", "-1"], env={})
    # the flag and the variable glibc already applied: one of the two, not a silent winner
    with pytest.raises(ArgumentError, match="MALLOC_MMAP_THRESHOLD_=4096 in the environment, which glibc already "
                                            "applied: keep one of the two"):
        parse_args([*TINY_MODEL, "--lr", "1e-3", "--train-iters", "3", "--data-path", "x",
                    "--malloc-mmap-threshold", "1048576"], env={"MALLOC_MMAP_THRESHOLD_": "4096"})
