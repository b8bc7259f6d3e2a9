"""Schedules from the configuration (its schedule section, plus the run length and batch of the training
section, the sequence length and the weight decay): the spec, the scheduler, and the units an
iteration advances it by."""
from __future__ import annotations

from typing import Any

from megatron.config import Config
from megatron.schedules.scheduler import OptimizerParamScheduler
from megatron.schedules.styles import ScheduleSpec

_WSD_STYLE_ALIASES = {"minus_sqrt": "1-sqrt"}  # Megatron-LM's spelling


def _seq_length(config: Config) -> int:
    seq = config.model.seq_length
    if not seq:
        raise ValueError("token-based LR schedules (--lr-decay-tokens) need --seq-length")
    return int(seq)


def scheduler_increment(config: Config) -> int:
    """Units consumed per iteration: the global batch size in samples, times seq_length in token mode.

    The trainer passes ``lr_kwargs={"increment": scheduler_increment(config)}`` to ``engine.step``.
    """
    gbs = int(config.training.global_batch_size)
    if config.schedule.lr_decay_tokens is not None:
        return gbs * _seq_length(config)
    return gbs


def build_schedule_spec(config: Config) -> ScheduleSpec:
    """Translate the configuration into a ScheduleSpec (units of ``scheduler_increment``)."""
    sched = config.schedule
    gbs = int(config.training.global_batch_size)
    style = sched.lr_decay_style
    tokens_mode = sched.lr_decay_tokens is not None
    train_iters = config.training.train_iters
    train_samples = config.training.train_samples
    if sched.lr is None:
        raise ValueError("--lr is required")

    unit = "tokens" if tokens_mode else "samples"
    per_sample = _seq_length(config) if tokens_mode else 1  # units per sample
    per_iter = gbs * per_sample  # units per iteration

    # Decay span D.
    if tokens_mode:
        D = int(sched.lr_decay_tokens)
    elif sched.lr_decay_iters is not None:
        D = int(sched.lr_decay_iters) * per_iter
    elif sched.lr_decay_samples is not None:
        D = int(sched.lr_decay_samples) * per_sample
    elif train_iters is not None:
        D = int(train_iters) * per_iter
    elif train_samples is not None:
        D = int(train_samples) * per_sample
    else:
        raise ValueError("the LR schedule needs --train-iters or --train-samples (or --lr-decay-*)")

    # Warmup W.
    frac = sched.lr_warmup_fraction
    warmup_iters = int(sched.lr_warmup_iters)
    warmup_samples = int(sched.lr_warmup_samples)
    warmup_tokens = sched.lr_warmup_tokens
    if frac is not None and (warmup_iters or warmup_samples or warmup_tokens is not None):
        raise ValueError("give either --lr-warmup-fraction or --lr-warmup-iters/-samples/-tokens, not both")
    if frac is not None:
        W = round(float(frac) * D)
    elif tokens_mode and warmup_tokens is not None:
        W = int(warmup_tokens)
    elif warmup_iters:
        W = warmup_iters * per_iter
    else:
        W = warmup_samples * per_sample

    # Infinite styles: plateau Kc and max->c phase Cd.
    constant_tokens = sched.lr_constant_tokens
    cooldown_tokens = sched.lr_cooldown_tokens
    Kc = int(constant_tokens) if tokens_mode and constant_tokens is not None else \
        round(float(sched.lr_constant_fraction) * D)
    Cd = int(cooldown_tokens) if tokens_mode and cooldown_tokens is not None else \
        round(float(sched.lr_cooldown_fraction) * D)

    # Final cooldown, stated as a fraction of D, as the last R iterations, or as a start iteration S.
    cooldown_iters = sched.lr_cooldown_iters
    cooldown_start = sched.lr_cooldown_start_iter
    if cooldown_iters is not None and cooldown_start is not None:
        raise ValueError("give either --lr-cooldown-iters or --lr-cooldown-start-iter, not both")
    explicit_cooldown = None
    if cooldown_iters is not None:
        explicit_cooldown = int(cooldown_iters) * per_iter
    elif cooldown_start is not None:
        explicit_cooldown = D - int(cooldown_start) * per_iter
        if explicit_cooldown <= 0:
            raise ValueError(f"--lr-cooldown-start-iter {cooldown_start} is at or after the end of the decay "
                             f"span ({D // per_iter} iterations)")

    plus_cooldown = bool(sched.lr_constant_plus_cooldown)
    if (plus_cooldown or explicit_cooldown is not None) and style not in ("constant", "wsd"):
        raise ValueError(f"--lr_constant_plus_cooldown / --lr-cooldown-iters / --lr-cooldown-start-iter apply to "
                         f"--lr-decay-style constant (or wsd), not {style!r}")
    if plus_cooldown and style == "wsd":
        raise ValueError("--lr_constant_plus_cooldown applies to --lr-decay-style constant; wsd has its own decay "
                         "(--lr-wsd-decay-iters)")
    Cc = 0
    if style == "constant":
        if explicit_cooldown is not None:
            Cc = explicit_cooldown
        elif plus_cooldown:
            Cc = round(float(sched.lr_constant_plus_cooldown_frac) * D)

    wsd_style = sched.lr_wsd_decay_style
    wsd_style = _WSD_STYLE_ALIASES.get(wsd_style, wsd_style)
    wsd_steps = 0
    if style == "wsd":
        if sched.lr_wsd_decay_iters is not None:
            wsd_steps = int(sched.lr_wsd_decay_iters) * per_iter
        elif sched.lr_wsd_decay_samples is not None:
            wsd_steps = int(sched.lr_wsd_decay_samples) * per_sample
        elif explicit_cooldown is not None:
            wsd_steps = explicit_cooldown
        else:
            raise ValueError("--lr-decay-style wsd needs the decay length: --lr-wsd-decay-iters, "
                             "--lr-cooldown-iters or --lr-cooldown-start-iter")

    return ScheduleSpec(
        max_lr=float(sched.lr),
        min_lr=float(sched.min_lr),
        warmup_steps=int(W),
        decay_steps=int(D),
        end_steps=int(D),
        decay_style=style,
        constant_lr=float(sched.constant_lr),
        constant_steps=int(Kc),
        cooldown_steps=int(Cd),
        constant_plus_cooldown_steps=int(Cc),
        timescale=float(sched.timescale),
        wsd_decay_steps=int(wsd_steps),
        wsd_decay_style=wsd_style,
        unit=unit,
    )


def build_scheduler(optimizer: Any, config: Config) -> OptimizerParamScheduler:
    """The scheduler the trainer hands to ``deepspeed.initialize(lr_scheduler=...)``."""
    spec = build_schedule_spec(config)
    training, opt = config.training, config.optimizer
    per_sample = _seq_length(config) if spec.unit == "tokens" else 1
    if training.train_iters is not None:
        wd_incr_steps = int(training.train_iters) * int(training.global_batch_size) * per_sample
    elif training.train_samples is not None:
        wd_incr_steps = int(training.train_samples) * per_sample
    else:
        wd_incr_steps = spec.decay_steps
    wd = float(opt.weight_decay)
    return OptimizerParamScheduler(
        optimizer,
        spec,
        start_wd=float(wd if opt.start_weight_decay is None else opt.start_weight_decay),  # None: constant
        end_wd=float(wd if opt.end_weight_decay is None else opt.end_weight_decay),
        wd_incr_steps=wd_incr_steps,
        wd_incr_style=opt.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=bool(config.schedule.use_checkpoint_opt_param_scheduler),
        override_opt_param_scheduler=bool(config.schedule.override_opt_param_scheduler),
    )
