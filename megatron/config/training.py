"""Training-loop, optimizer and learning-rate schedule sections of the configuration."""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron.config.base import Section, positive


@dataclass(frozen=True)
class TrainingConfig(Section):
    """Batch sizes, run length, evaluation, exits, numerical-fault limits, recompute and compile."""
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    train_iters: int | None = None
    train_samples: int | None = None
    train_tokens: int | None = None
    eval_interval: int = 1000
    eval_iters: int = 100
    eval_on_start: bool = False
    skip_train: bool = False
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = False
    kill_switch_file: str | None = None
    max_skipped_iterations: int | None = None
    loss_spike_factor: float = 5.0
    check_args: bool = False
    skip_memory_check: bool = False
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1
    deepspeed_activation_checkpointing: bool = False
    recompute_granularity: str | None = None
    compile: bool | None = None
    malloc_mmap_threshold: int = 0  # bytes; 0: glibc's rising default (megatron/resilience/allocator.py)
    allocator: str = "glibc"  # --allocator: glibc or mimalloc (preloaded: megatron/resilience/allocator.py)

    def validate(self) -> list[str]:
        errs = positive(self, "micro_batch_size", "eval_interval")
        if self.malloc_mmap_threshold < 0:
            errs.append(f"--malloc-mmap-threshold must be >= 0 bytes (got {self.malloc_mmap_threshold}); 0 keeps "
                        "glibc's default")
        if self.eval_iters < 0:
            errs.append(f"--eval-iters must be >= 0 (got {self.eval_iters})")
        if (self.train_iters is None) == (self.train_samples is None):
            errs.append("give exactly one of --train-iters and --train-samples")
        errs += [f"{e}; with TRAIN_TOKENS, make it at least seq-length x global-batch-size"
                 for e in positive(self, "train_iters", "train_samples")]
        if self.max_skipped_iterations is not None and self.max_skipped_iterations < 1:
            errs.append(f"--max-skipped-iterations must be >= 1 (got {self.max_skipped_iterations})")
        if not (self.loss_spike_factor >= 0 and math.isfinite(self.loss_spike_factor)):
            errs.append(f"--loss-spike-factor must be a finite number >= 0 (got {self.loss_spike_factor})")
        return errs


@dataclass(frozen=True)
class OptimizerConfig(Section):
    """--optimizer (the registry name, megatron/optimizer/), weight decay, clipping and each family's flags."""
    optimizer: str = 'adamw'
    weight_decay: float = 0.01
    start_weight_decay: float | None = None
    end_weight_decay: float | None = None
    weight_decay_incr_style: str = 'constant'
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-08
    sgd_momentum: float = 0.9
    cpu_optimizer: bool = False
    cpu_torch_adam: bool = False
    ds_fused_adam: bool = False
    sophiag_beta1: float = 0.9
    sophiag_beta2: float = 0.95
    sophiag_rho: float = 0.01
    sophiag_hessian_interval: int = 10
    dshampooadamw_max_preconditioner_dim: int = 8192
    dshampooadamw_precondition_freq: int = 100
    dshampooadamw_use_decoupled_weight_decay: bool = True
    dshampooadamw_eps: float = 1e-12
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muonadamw_beta1: float = 0.9
    muonadamw_beta2: float = 0.999
    muonadamw_eps: float = 1e-12
    muonclip_t: float = 100.0
    muonclip_alpha: float = 0.5
    schedulefree_for_each: bool = False
    ademamix_beta3: float = 0.9999
    ademamix_alpha: float = 5.0
    ademamix_warmup_iters: int | None = None


@dataclass(frozen=True)
class ScheduleConfig(Section):
    """Learning rate, its warmup / decay / cooldown (megatron/schedules/) and the LR range test."""
    lr: float | None = None
    min_lr: float = 0.0
    lr_decay_style: str = 'linear'
    lr_decay_iters: int | None = None
    lr_decay_samples: int | None = None
    lr_decay_tokens: int | None = None
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int = 0
    lr_warmup_samples: int = 0
    lr_warmup_tokens: int | None = None
    lr_constant_tokens: int | None = None
    lr_constant_fraction: float = 0.001
    lr_cooldown_tokens: int | None = None
    lr_cooldown_fraction: float = 0.65
    constant_lr: float = 0.00011
    timescale: float = 10.0
    lr_constant_plus_cooldown: bool = False
    lr_constant_plus_cooldown_frac: float = 0.05
    lr_cooldown_iters: int | None = None
    lr_cooldown_start_iter: int | None = None
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_samples: int | None = None
    lr_wsd_decay_style: str = '1-sqrt'
    lr_finder: bool = False
    lr_finder_min: float = 1e-06
    lr_finder_max: float = 1.0
    lr_finder_fraction: float = 1.0
    lr_finder_stop_factor: float = 4.0
    lr_finder_beta: float = 0.98
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    warmup: int | None = None

    def validate(self) -> list[str]:
        errs = []
        if self.lr is None:
            errs.append("--lr is required (the maximum learning rate)")
        else:
            if not (self.lr >= 0 and math.isfinite(self.lr)):
                errs.append(f"--lr must be a finite number >= 0 (got {self.lr})")
            if self.min_lr > self.lr:
                errs.append(f"--min-lr ({self.min_lr}) must be <= --lr ({self.lr})")
        frac = self.lr_warmup_fraction
        if frac is not None and not 0.0 <= frac <= 1.0:
            errs.append(f"--lr-warmup-fraction must be in [0, 1] (got {frac})")
        if frac is not None and (self.lr_warmup_iters != 0 or self.lr_warmup_samples != 0):
            errs.append("--lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples are mutually exclusive")
        if self.warmup is not None:
            errs.append("--warmup is deprecated: use --lr-warmup-fraction or --lr-warmup-iters")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            errs.append("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually "
                        "exclusive (unset OVERRIDE_CKPT_OPT_PARAM or drop --override-opt_param-scheduler)")
        return errs
