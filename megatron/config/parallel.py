"""Parallel layout, ZeRO and the distributed engine (megatron/core/, megatron/initialize.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.config.base import Section, positive


@dataclass(frozen=True)
class ParallelConfig(Section):
    """TP / PP / Ulysses SP sizes, the ZeRO stage asked for, the backend and DeepSpeed's own flags."""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    ds_sequence_parallel_size: int = 1
    sequence_parallel: bool = False
    no_pipeline_parallel: bool = False
    zero_stage: int = 1
    keep_zero_stage: bool = False
    distributed_backend: str | None = None
    distributed_timeout_minutes: float = 10
    local_rank: int | None = None
    DDP_impl: str | None = None
    overlap_grad_reduce: bool | None = None
    ddp_bucket_size: int | None = None
    deepspeed: bool = False
    deepspeed_config: str | None = None
    deepspeed_mpi: bool = False

    def validate(self) -> list[str]:
        errs = positive(self, "tensor_model_parallel_size", "pipeline_model_parallel_size", "ds_sequence_parallel_size")
        if self.zero_stage not in (0, 1, 2, 3):
            errs.append(f"--zero-stage must be 0, 1, 2 or 3 (got {self.zero_stage})")
        timeout = self.distributed_timeout_minutes
        if not (math.isfinite(timeout) and timeout > 0):
            errs.append(f"--distributed-timeout-minutes must be a finite number > 0 (got {timeout})")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size <= 0:
            errs.append(f"--ddp-bucket-size must be > 0 elements (got {self.ddp_bucket_size})")
        return errs
