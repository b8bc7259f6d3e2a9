"""Model FLOPs and MFU (model FLOPs utilization).

* ``flops_per_iteration(config)``: the Megatron-LM formula the upstream logger prints as
  ``TFLOPs`` (upstream-spec §11.1), forward + backward of one global batch, no recompute.
* ``PeakFlops``: the dense peak of one device, from ``--peak-tflops`` when given, else from a
  table of known accelerators (bf16 / fp32 datasheet numbers; Intel Max 1550 uses ezpz's
  assumption of 512 ops/clock x compute units x 1.3 GHz per tile), else measured once at
  start-up with a matmul benchmark on the device (CPUs and unknown devices).
* MFU = achieved TFLOPS per device / peak TFLOPS per device.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from megatron.config import Config

log = logging.getLogger(__name__)

# Dense peak TFLOPS per device: name fragment -> {dtype: TFLOPS}. The first matching fragment wins,
# so more specific names come first.
PEAK_TFLOPS_TABLE: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIE", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("MAX 1550", {"bf16": 298.2, "fp32": 26.0}),  # per tile: bf16 = ezpz's 448-CU assumption; fp32 = 52 TF/2 tiles
]
INTEL_MAX_OPS_PER_CLOCK_PER_CU = 512
INTEL_MAX_CLOCK_GHZ = 1.3


def flops_per_iteration(config: Config) -> float:
    """Megatron-LM's model FLOPs of one iteration (forward + backward, one global batch):
    12·B·s·L·h²·(1 + (f/h)·(3/2 if swiglu) + kv/heads + s/h + V/(2·L·h))."""
    m = config.model
    b, s, L, h = config.training.global_batch_size, m.seq_length, m.num_layers, m.hidden_size
    f, V = m.ffn_hidden_size, config.runtime.padded_vocab_size
    gated = 1.5 if m.swiglu else 1.0
    return 12 * b * s * L * h * h * (1 + (f / h) * gated + m.num_key_value_heads / m.num_attention_heads
                                     + s / h + V / (2 * L * h))


@dataclass(frozen=True)
class PeakFlops:
    """Peak TFLOPS of one device and where the number came from."""
    tflops: float
    source: str  # "--peak-tflops", "table: <name>", "measured: <details>"

    def mfu(self, achieved_tflops: float) -> float:
        return achieved_tflops / self.tflops if self.tflops > 0 else float("nan")


def device_name(device_type: str) -> str:
    """The accelerator's marketing name ("" on CPU or when unknown)."""
    try:
        if device_type == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_name()
        if device_type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.xpu.get_device_name()
    except Exception:  # noqa: BLE001  (a broken driver must not stop training)
        return ""
    return ""


def table_peak(name: str, dtype: str, compute_units: int | None = None) -> float | None:
    """Peak from the table for a device name, or None when the device is not in it."""
    key = "bf16" if dtype in ("bf16", "fp16") else "fp32"
    upper = name.upper()
    if "MAX 1" in upper and compute_units and key == "bf16":  # Intel Data Center GPU Max: scale with its CUs
        return INTEL_MAX_OPS_PER_CLOCK_PER_CU * compute_units * INTEL_MAX_CLOCK_GHZ * 1e9 / 1e12
    for fragment, peaks in PEAK_TFLOPS_TABLE:
        if fragment in upper:
            return peaks[key]
    return None


def measure_matmul_tflops(dtype: torch.dtype = torch.float32, n: int = 1024, min_seconds: float = 0.3,
                          device: str | torch.device = "cpu") -> float:
    """Achieved TFLOPS of repeated n×n matmuls (2·n³ FLOPs each) on `device`: the practical peak."""
    gen = torch.Generator().manual_seed(0)  # not the global RNG: a resumed run must see the saved stream
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    sync = _synchronizer(torch.device(device).type)
    a @ b  # warm-up (thread pool, kernel selection: the first call can take far longer than the next)
    sync()
    start = time.perf_counter()
    a @ b
    sync()
    one = time.perf_counter() - start
    if one >= min_seconds:
        # a warm matmul takes the time given: a dtype the device emulates (fp16 on a CPU: ~2 s per
        # 1024^3 matmul), whose rate one matmul measures as well as the 5 more of the loop below would
        return 2.0 * n ** 3 / one / 1e12
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return 2.0 * n ** 3 * reps / elapsed / 1e12


def _synchronizer(device_type: str):
    mod = getattr(torch, device_type, None)
    if device_type != "cpu" and mod is not None and hasattr(mod, "synchronize"):
        return mod.synchronize
    return lambda: None


def resolve_peak(peak_tflops: float | None, device_type: str, dtype: str, *, measure_seconds: float = 0.3,
                 reduce_mean=None) -> PeakFlops:
    """The per-device peak: the flag, else the table, else a measurement on this device.

    `reduce_mean` (optional) averages the measurement over ranks so that every rank reports
    the same peak; ranks measure at the same time, so sharing a CPU is accounted for."""
    if peak_tflops:
        return PeakFlops(float(peak_tflops), "--peak-tflops")
    name = device_name(device_type)
    cus = None
    if device_type == "xpu" and name:
        try:
            cus = int(torch.xpu.get_device_properties().max_compute_units)
        except Exception:  # noqa: BLE001
            cus = None
    peak = table_peak(name, dtype, cus) if name else None
    if peak is not None:
        return PeakFlops(peak, f"table: {name} {dtype}")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    device = device_type if device_type != "cpu" else "cpu"
    measured = measure_matmul_tflops(torch_dtype, min_seconds=measure_seconds, device=device)
    if reduce_mean is not None:
        measured = reduce_mean(measured)
    what = name or f"{device_type}, {torch.get_num_threads()} threads"
    return PeakFlops(measured, f"measured: {dtype} 1024x1024 matmul on {what}")
