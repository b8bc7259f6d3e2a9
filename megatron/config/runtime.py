"""Values no flag sets: derived by validation (megatron/arguments.py) or set by initialisation code.
Each is declared here with the value it has before that code runs, so no module invents an attribute."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron.config.base import Section

# Runtime fields a checkpoint does not store (they describe this process, not the run).
NOT_SAVED = ("checkpoint_fallback", "memory_estimate")


@dataclass(frozen=True)
class RuntimeConfig(Section):
    # the command line as given (the start-up table shows which flags were given)
    argv: list[str] = field(default_factory=list)
    # the launcher's process count, and this process (megatron/initialize.py)
    world_size: int = 1
    rank: int = 0
    device_type: str = "cpu"
    # derived from the parallel layout and the batch sizes (megatron/arguments.py validate_args)
    data_parallel_size: int = 1
    num_micro_batches: int = 1
    params_dtype: str = "fp32"
    use_flash_attn: bool = False
    recompute_num_layers: int = 1
    # --zero-stage as asked when a single-replica run uses stage 0 instead (None: as asked)
    zero_stage_requested: int | None = None
    # the vocabulary: the tokenizer's and padded to a multiple of make-vocab-size-divisible-by x TP
    vocab_size_orig: int | None = None
    padded_vocab_size: int | None = None
    # --compile: why it is on or off (the start-up table)
    compile_reason: str | None = None
    # --malloc-mmap-threshold: what the C allocator was set to (the start-up table)
    malloc_setting: str | None = None
    # --lr-finder: where its outputs go
    lr_finder_dir: str | None = None
    # --use-checkpoint-args: the model arguments taken from the checkpoint (name -> value)
    checkpoint_args_used: dict | None = None
    # --fallback-to-intact-checkpoint: why another tag is loaded (the warning at load time)
    checkpoint_fallback: str | None = None
    # the memory estimate of the preflight check, for the out-of-memory message
    memory_estimate: str | None = None
