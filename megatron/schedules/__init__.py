"""Learning-rate and weight-decay schedules.

* `styles`: the `ScheduleSpec` and the registry of LR styles (one `register_schedule` entry each:
  formula, validation, description); `lr_at` = warmup, then the style.
* `scheduler`: `OptimizerParamScheduler`, the stateful object DeepSpeed steps, saves and loads
  (with upstream's legacy state-dict keys), and the weight-decay schedule (`wd_at`).
* `build`: from the parsed arguments: `build_schedule_spec`, `build_scheduler`,
  `scheduler_increment` (samples, or tokens with ``--lr-decay-tokens``, per iteration).
"""
from megatron.schedules.build import build_schedule_spec, build_scheduler, scheduler_increment  # noqa: F401
from megatron.schedules.scheduler import (  # noqa: F401
    SPEC_KEYS, WD_INCR_STYLES, OptimizerParamScheduler, normalize_state, wd_at)
from megatron.schedules.styles import (  # noqa: F401
    DECAY_SHAPES, LR_SCHEDULES, UNITS, ScheduleError, ScheduleSpec, ScheduleStyle, lr_at, register_schedule)
