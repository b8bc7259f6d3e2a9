"""Small measurements shared by the log line and the run summary: durations, this process's
memory, sums over ranks and the groups they run over."""
from __future__ import annotations

import math
import os
import resource

import torch
import torch.distributed as dist



def format_duration(seconds: float) -> str:
    """h:mm:ss (hours unbounded)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def memory_stats(device_type: str) -> dict[str, float]:
    """Memory of this process in GB: accelerator allocator counters, or host RSS on a CPU."""
    gb = 1024 ** 3
    mod = getattr(torch, device_type, None) if device_type in ("cuda", "xpu") else None
    if mod is not None and mod.is_available():
        return {"allocated_gb": mod.memory_allocated() / gb, "max_allocated_gb": mod.max_memory_allocated() / gb,
                "reserved_gb": mod.memory_reserved() / gb}
    out = {"max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gb}
    try:
        with open("/proc/self/statm") as f:
            out["rss_gb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / gb
    except (OSError, ValueError, IndexError):
        pass
    return out


def _human_seconds(seconds: float) -> str:
    """'12.3 s' under a minute, else h:mm:ss."""
    return f"{seconds:.1f} s" if 0 <= seconds < 60 else format_duration(seconds)


def _zero_partition_group():
    """ZeRO partitions the optimizer state over the data- and Ulysses-sequence-parallel ranks."""
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state  # noqa: PLC0415

    return parallel_state.get_sequence_data_parallel_group()


def _data_parallel_group():
    """Tensor/pipeline-parallel ranks see the same samples: count them once, over data parallelism."""
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state  # noqa: PLC0415

    return parallel_state.get_data_parallel_group()
