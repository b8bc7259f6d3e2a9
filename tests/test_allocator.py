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


# ---------------------------------------------------------------------------------------- --allocator mimalloc
def _args(*extra: str) -> list[str]:
    from distributed import TINY_MODEL

    return [*TINY_MODEL, "--lr", "1e-3", "--train-iters", "3", "--data-path", "x", *extra]


def test_requested_allocator_reads_the_last_flag_before_argparse():
    from megatron.resilience.allocator import requested_allocator

    assert requested_allocator(["--lr", "1"]) == "glibc"
    assert requested_allocator(["--allocator", "mimalloc", "--lr", "1"]) == "mimalloc"
    assert requested_allocator(["--allocator=mimalloc", "--allocator", "glibc"]) == "glibc"
    assert requested_allocator(["--allocator"]) == "glibc"  # no value: argparse refuses it


def test_mimalloc_refusals_name_the_fix(monkeypatch):
    from megatron.arguments import ArgumentError, parse_args
    from megatron.resilience import allocator

    assert parse_args(_args(), env={}).allocator == "glibc"
    # in this (not preloaded) process: the in-process caller is told how to start it
    with pytest.raises(ArgumentError, match=r"--allocator mimalloc: this process was started without it; run "
                                            r"pretrain_gpt.py as a program .* LD_PRELOAD=.*libmimalloc.so"):
        parse_args(_args("--allocator", "mimalloc"), env={})
    # --check-args (the launcher's pre-run check) only needs the library to be there
    assert parse_args(_args("--allocator", "mimalloc", "--check-args"), env={}).allocator == "mimalloc"
    with pytest.raises(ArgumentError, match="--malloc-mmap-threshold 1048576 sets glibc's malloc, which --allocator "
                                            "mimalloc replaces: drop one of the two"):
        parse_args(_args("--allocator", "mimalloc", "--malloc-mmap-threshold", "1048576", "--check-args"), env={})
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
    with pytest.raises(ArgumentError, match=r"--allocator mimalloc: the library is not installed: pip install "
                                            r"cmeel-mimalloc \(or drop --allocator\)"):
        parse_args(_args("--allocator", "mimalloc", "--check-args"), env={})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD, /proc/self/maps")
def test_mimalloc_trainer_reexecutes_itself_with_the_library(tmp_path):
    """`python pretrain_gpt.py --allocator mimalloc`: the process replaces itself by the same command with
    libmimalloc preloaded (same pid, transparent huge pages off), trains, and the start-up table says so. A
    sitecustomize module records each interpreter start: pid, MIMALLOC_ALLOW_THP, libmimalloc mapped."""
    from distributed import TINY_MODEL, make_dataset, read_metrics

    data = make_dataset(str(tmp_path / "data"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n"
        f"with open({str(tmp_path / 'starts')!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()} {os.environ.get(\"MIMALLOC_ALLOW_THP\")} '\n"
        "            f'{\"/libmimalloc.so\" in open(\"/proc/self/maps\").read()}\\n')\n")
    flags = [*TINY_MODEL, "--train-iters", "2", "--lr", "1e-3", "--data-file-list", data, "--split", "100,0,0",
             "--data-cache-path", str(tmp_path / "cache"), "--micro-batch-size", "2", "--global-batch-size", "2",
             "--eval-iters", "0", "--log-interval", "1", "--peak-tflops", "1", "--allocator", "mimalloc",
             "--metrics-file", str(tmp_path / "metrics.jsonl")]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MIMALLOC_ALLOW_THP")}
    env.update(PYTHONPATH=f"{site}:{ROOT}", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *flags], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    first, second = (line.split() for line in (tmp_path / "starts").read_text().splitlines())
    assert first[0] == second[0]  # the same process, re-executed
    assert first[1:] == ["None", "False"] and second[1:] == ["0", "True"]
    row = [ln for ln in (p.stdout + p.stderr).splitlines() if "C allocator" in ln]
    assert row and "mimalloc (libmimalloc.so preloaded; transparent huge pages off)" in row[0], row
    assert sorted(read_metrics(str(tmp_path / "metrics.jsonl"))[0]) == [1, 2]  # it trained
