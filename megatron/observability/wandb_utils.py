"""Weights & Biases, optional: used when `wandb` is importable, `WANDB_MODE` is not `disabled` and
`WANDB_DISABLED` (the name upstream's docs give) is not set to true/1/yes.

Project: `--wandb-project`, else `WB_PROJECT`, else `WANDB_PROJECT`, else "AuroraGPT" (upstream's
order). Run name: `--wandb-exp-name` (else W&B's own). Files: `--wandb-save-dir`, else the run's
`--save` directory, else the working directory. Without an API key and without an explicit
`WANDB_MODE`, W&B is not used (no login prompt, no files); `WANDB_MODE=offline` records the
run locally (upload it later with `wandb sync <dir>`). Only rank 0 creates a run; every failure
is a warning, never fatal.
"""
from __future__ import annotations

import logging
import os

from megatron.config import Config, LoggingConfig

log = logging.getLogger(__name__)


def wandb_project(logging_config: LoggingConfig, env=os.environ) -> str:
    return logging_config.wandb_project or env.get("WB_PROJECT") or env.get("WANDB_PROJECT") or "AuroraGPT"


def wandb_disabled(env=os.environ) -> bool:
    """WANDB_MODE=disabled, or WANDB_DISABLED=true/1/yes (upstream documented the latter, read the former)."""
    return (env.get("WANDB_MODE", "").lower() == "disabled"
            or env.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes", "on"))


def init_wandb(config: Config, env=os.environ):
    """A wandb run on rank 0 (or None: other ranks, not installed, WANDB_MODE=disabled, or failure)."""
    if config.runtime.rank != 0 or wandb_disabled(env):
        return None
    try:
        import wandb  # noqa: PLC0415
    except ImportError:
        return None
    mode = env.get("WANDB_MODE") or None
    if mode is None and not env.get("WANDB_API_KEY"):
        try:
            has_key = bool(wandb.Api().api_key)
        except Exception:  # noqa: BLE001
            has_key = False
        if not has_key:
            log.info("W&B: wandb is installed but not logged in and WANDB_MODE is unset: not used "
                     "(wandb login, or WANDB_MODE=offline to record locally)")
            return None
    save_dir = config.logging.wandb_save_dir or config.checkpoint.save or os.getcwd()
    os.makedirs(save_dir, exist_ok=True)
    try:
        run = wandb.init(project=wandb_project(config.logging, env), name=config.logging.wandb_exp_name,
                         dir=save_dir, mode=mode, config={"args": _jsonable_args(config)})
    except Exception as e:  # noqa: BLE001  (W&B must never stop a training run)
        log.warning("W&B disabled: wandb.init failed: %s", e)
        return None
    log.info("W&B: project %s, run %s, mode %s, dir %s", wandb_project(config.logging, env), run.name,
             mode or "online", save_dir)
    return run


def _jsonable_args(config: Config) -> dict:
    """The upstream flat argument names and values (W&B's run config, as before), JSON-friendly."""
    out = {}
    for k, v in sorted(vars(config.to_args()).items()):
        out[k] = v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v)
    return out
