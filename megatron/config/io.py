"""Data, checkpoint and logging sections of the configuration."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron.config.base import Section, positive


@dataclass(frozen=True)
class DataConfig(Section):
    """Data files, split, loader and tokenizer (megatron/data/, megatron/tokenizer/)."""
    data_path: list[str] | None = None
    data_file_list: str | None = None
    shuffle_sample_in_corpus: bool = False
    blend_sample_in_corpus: bool = False
    split: str = '969, 30, 1'
    data_cache_path: str | None = None
    data_impl: str = 'infer'
    mmap_warmup: bool = False
    num_workers: int = 2
    dataloader_type: str = 'single'
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    trust_remote_code: bool = False
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    def validate(self) -> list[str]:
        errs = []
        if self.data_file_list is None and not self.data_path:
            errs.append("no training data: give --data-file-list (DATA_FILE_LIST=...) or --data-path")
        if self.data_file_list is not None and not os.path.isfile(self.data_file_list):
            errs.append(f"--data-file-list {self.data_file_list}: file not found (check DATA_FILE_LIST)")
        return errs


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """Save / load / resume / finetune / universal checkpoints (megatron/checkpoint/)."""
    save: str | None = None
    save_interval: int | None = None
    no_save_optim: bool = False
    no_save_rng: bool = False
    load: str | None = None
    load_tag: str | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_load_lr_state: bool = False
    finetune: bool = False
    use_checkpoint_args: bool = False
    exit_on_missing_checkpoint: bool = False
    universal_checkpoint: bool = False
    reset_iteration: bool = False
    keep_last_n: int | None = None
    unsafe_checkpoint_load: bool = False
    verify_checkpoint: bool = False
    fallback_to_intact_checkpoint: bool = False

    def validate(self) -> list[str]:
        errs = []
        if self.save is not None and self.save_interval is not None and self.save_interval <= 0:
            errs.append(f"--save-interval must be > 0 (got {self.save_interval})")
        if self.keep_last_n is not None and self.keep_last_n < 1:
            errs.append(f"--keep-last-n must be >= 1 (got {self.keep_last_n})")
        if self.use_checkpoint_args and not self.load:
            errs.append("--use-checkpoint-args needs --load (the checkpoint whose model arguments to use); add "
                        "LOAD / --load or drop the flag")
        return errs


@dataclass(frozen=True)
class LoggingConfig(Section):
    """Log line, TensorBoard, W&B, metrics file, MFU and profiling (megatron/observability/)."""
    log_interval: int = 100
    timing_log_level: int = 0
    timing_log_option: str = 'minmax'
    tensorboard_dir: str | None = None
    tensorboard_log_interval: int = 1
    tensorboard_queue_size: int = 1000
    log_timers_to_tensorboard: bool = False
    log_batch_size_to_tensorboard: bool = False
    log_optimizer_states_to_tensorboard: bool = False
    log_world_size_to_tensorboard: bool = False
    log_validation_ppl_to_tensorboard: bool = False
    log_memory_to_tensorboard: bool = False
    log_params_norm: bool = False
    log_num_zeros_in_grad: bool = False
    log_learning_rate_to_tensorboard: bool = True
    log_loss_scale_to_tensorboard: bool = True
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    metrics_file: str | None = None
    peak_tflops: float | None = None
    profile: str | None = None
    profile_steps: str = '2,3'
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    trace_dir: str = './trace/'
    flops_profiler_step: int | None = None

    def validate(self) -> list[str]:
        errs = positive(self, "log_interval")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            errs.append(f"--peak-tflops must be > 0 (got {self.peak_tflops})")
        steps = self.profile_steps.replace(" ", "").split(",")
        if not (len(steps) == 2 and all(x.isdigit() for x in steps) and int(steps[0]) <= int(steps[1])):
            errs.append(f"--profile_steps must be 'first,last' iterations, e.g. 2,3 (got {self.profile_steps!r})")
        if self.flops_profiler_step is not None and self.flops_profiler_step < 1:
            errs.append(f"--flops-profiler-step must be >= 1 (got {self.flops_profiler_step})")
        return errs
