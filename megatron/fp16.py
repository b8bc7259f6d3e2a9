"""fp16 mixed precision: DeepSpeed's fp16 engine path with its (dynamic or static) loss scaler.

With ``--fp16`` DeepSpeed casts the model's parameters to float16, keeps float32 master weights
and optimizer state in its ZeRO optimizer (stages 1, 2, 3; stage 0 is refused, see below),
multiplies the loss by the loss scale before the backward, unscales the gradients, and skips the
update of a step whose gradients overflowed (inf/NaN) -- no weight change, no LR-scheduler
step (``DeepSpeedEngine._take_model_step`` steps the scheduler only when the step was applied),
``engine.skipped_steps`` incremented -- and then lowers the scale.

The upstream Megatron flags map onto the DeepSpeed config's ``fp16`` block; a flag given on the
command line wins over the launcher's JSON, an absent flag keeps the JSON's value (else
DeepSpeed's default, in brackets):

    --loss-scale S          loss_scale            S > 0: static scale S; 0 or absent: dynamic [0]
    --initial-loss-scale X  initial_scale_power   log2(X), X a power of two [2**16]
    --min-loss-scale M      min_loss_scale        dynamic scale floor, a whole number >= 1 [1]
    --loss-scale-window W   loss_scale_window     overflow-free steps before the scale doubles [1000]
    --hysteresis H          hysteresis            overflows tolerated before the scale halves [2]

Refused (one line each, before anything starts): these flags without --fp16, dynamic-scaling flags
with a static --loss-scale, out-of-range values, fp16 with pipeline parallelism (not tested), and
fp16 at ZeRO stage 0: DeepSpeed 0.19.8's stage 0 fp16 optimizer (`FP16_UnfusedOptimizer`) is broken
-- `engine.backward` scales the loss only for ZeRO optimizers, so its gradients are never scaled
yet still divided by the scale (updates loss-scale times too small, clipping never triggers;
DeepSpeed PR 8393 is the open fix), it has no hysteresis, and it grows the scale before unscaling.
A single-replica ZeRO-1/2 fp16 run therefore keeps its ZeRO stage (megatron/arguments.py).

On a CPU whose oneDNN has no native fp16 arithmetic, DeepSpeed's CPU accelerator reports fp16 as
unsupported and `deepspeed.initialize` refuses it. torch computes every fp16 op on such CPUs
(converting to float32 inside the kernel: the same rounding of inputs and outputs as a GPU's fp16
with fp32 accumulation), only more slowly, so `deepspeed_compat.allow_fp16_on_cpu` lets DeepSpeed run it.
"""
from __future__ import annotations

import json
import math
import os

from megatron.config import Config, PrecisionConfig

# flag dest -> (flag spelling, DeepSpeed fp16 key)
SCALER_FLAGS = {
    "loss_scale": ("--loss-scale", "loss_scale"),
    "initial_loss_scale": ("--initial-loss-scale", "initial_scale_power"),
    "min_loss_scale": ("--min-loss-scale", "min_loss_scale"),
    "loss_scale_window": ("--loss-scale-window", "loss_scale_window"),
    "hysteresis": ("--hysteresis", "hysteresis"),
}
DYNAMIC_ONLY = ("initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis")
DS_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "min_loss_scale": 1, "loss_scale_window": 1000,
               "hysteresis": 2}


def add_arguments(g) -> None:
    """The upstream Megatron loss-scaling flags (default: the DeepSpeed config's value)."""
    g.add_argument("--loss-scale", type=float,
                   help="fp16: static loss scale; 0 or unset = dynamic loss scaling")
    g.add_argument("--initial-loss-scale", type=float,
                   help="fp16 dynamic: initial loss scale, a power of two (DeepSpeed initial_scale_power = log2; "
                        "default: the DeepSpeed config's, else 2**16)")
    g.add_argument("--min-loss-scale", type=float,
                   help="fp16 dynamic: minimum loss scale, a whole number >= 1 "
                        "(default: the DeepSpeed config's, else 1)")
    g.add_argument("--loss-scale-window", type=float,
                   help="fp16 dynamic: overflow-free iterations before the scale doubles "
                        "(default: the DeepSpeed config's, else 1000)")
    g.add_argument("--hysteresis", type=int,
                   help="fp16 dynamic: overflows tolerated before the scale halves (default: the DeepSpeed "
                        "config's, else 2)")


def _file_block(path: str | None) -> dict:
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            block = json.load(f).get("fp16") or {}
    except (OSError, ValueError, AttributeError):
        return {}  # an unreadable config is reported where it is read (build_ds_config)
    return block if isinstance(block, dict) else {}


def _power_of_two(x: float) -> int | None:
    """log2(x) when x is a positive power of two (2**0 .. 2**127), else None."""
    if not (math.isfinite(x) and x > 0):
        return None
    mantissa, exponent = math.frexp(x)
    return exponent - 1 if mantissa == 0.5 and 0 <= exponent - 1 <= 127 else None


def _whole(x: float) -> bool:
    return math.isfinite(x) and float(x).is_integer()


def fp16_block(precision: PrecisionConfig, from_file: dict) -> dict:
    """The DeepSpeed ``fp16`` block: the launcher JSON's (`from_file`), enabled by --fp16, with the
    values of the flags given on the command line."""
    block = {**from_file, "enabled": bool(precision.fp16)}
    if not precision.fp16:
        return block
    for dest, (_flag, key) in SCALER_FLAGS.items():
        value = vars(precision)[dest]
        if value is None:
            continue
        if dest == "initial_loss_scale":
            block[key] = _power_of_two(value)
        elif dest == "loss_scale":
            block[key] = float(value)
        else:
            block[key] = int(value)
    return block


def effective_settings(config: Config) -> dict:
    """The loss-scaler values DeepSpeed will use: flag > the DeepSpeed config's fp16 block > its default."""
    block = fp16_block(config.precision, _file_block(config.parallel.deepspeed_config))
    return {**DS_DEFAULTS, **{k: v for k, v in block.items() if k in DS_DEFAULTS}}


def describe(config: Config) -> str:
    """One line for the start-up configuration table."""
    eff = effective_settings(config)
    if float(eff["loss_scale"]):
        return f"static {float(eff['loss_scale']):g}"
    return (f"dynamic: initial 2**{eff['initial_scale_power']}, window {eff['loss_scale_window']}, "
            f"hysteresis {eff['hysteresis']}, min {eff['min_loss_scale']}")


def fp16_problems(config: Config) -> list[str]:
    """Loss-scaling flags and the effective fp16 block, one line per problem naming the fix."""
    prec = config.precision
    given = [flag for dest, (flag, _) in SCALER_FLAGS.items() if vars(prec)[dest] is not None]
    if not prec.fp16:
        return [f"{', '.join(given)}: loss scaling applies to fp16 only; add --fp16 (DTYPE=fp16) or drop "
                f"{'them' if len(given) > 1 else 'it'}"] if given else []
    errs: list[str] = []
    if config.parallel.zero_stage == 0:
        errs.append("--fp16 at ZeRO stage 0 is refused: DeepSpeed's stage 0 fp16 optimizer never scales the loss "
                    "(its updates come out loss-scale times too small and --clip-grad never applies), has no "
                    "hysteresis and unscales with the already-grown scale; use --zero-stage 1 (ZERO_STAGE=1) or 2, "
                    "or --bf16")
    if config.parallel.pipeline_model_parallel_size > 1:
        errs.append("--fp16 with pipeline parallelism (PP > 1) is not tested here yet; use --bf16 or PP=1")
    ls, ils, mls = prec.loss_scale, prec.initial_loss_scale, prec.min_loss_scale
    if ls is not None and not (math.isfinite(ls) and ls >= 0):
        errs.append(f"--loss-scale must be a finite number >= 0 (0 = dynamic loss scaling; got {ls})")
    if ils is not None and _power_of_two(ils) is None:
        errs.append(f"--initial-loss-scale must be a power of two between 1 and 2**127 (DeepSpeed takes its "
                    f"log2 as initial_scale_power; got {ils})")
    if mls is not None and not (_whole(mls) and mls >= 1):
        errs.append(f"--min-loss-scale must be a whole number >= 1 (DeepSpeed's min_loss_scale is an integer; "
                    f"got {mls})")
    if prec.loss_scale_window is not None and not (_whole(prec.loss_scale_window) and prec.loss_scale_window >= 1):
        errs.append(f"--loss-scale-window must be a whole number >= 1 (got {prec.loss_scale_window})")
    if prec.hysteresis is not None and prec.hysteresis < 1:
        errs.append(f"--hysteresis must be >= 1 (got {prec.hysteresis})")
    if ls:  # static: the dynamic scaler's flags would do nothing
        dyn = [SCALER_FLAGS[d][0] for d in DYNAMIC_ONLY if vars(prec)[d] is not None]
        if dyn:
            errs.append(f"{', '.join(dyn)} only apply to dynamic loss scaling, but --loss-scale {ls:g} is static; "
                        "drop them or drop --loss-scale")
    if errs:
        return errs
    # the values DeepSpeed will use (flag > launcher JSON > DeepSpeed default)
    eff = effective_settings(config)
    ds_file = config.parallel.deepspeed_config
    where = f"the fp16 block of {ds_file}" if ds_file else "DeepSpeed's default"
    try:
        dynamic = float(eff["loss_scale"]) == 0
        power, floor = int(eff["initial_scale_power"]), float(eff["min_loss_scale"])
        ok = (float(eff["loss_scale"]) >= 0 and int(eff["loss_scale_window"]) >= 1 and int(eff["hysteresis"]) >= 1
              and floor >= 1 and power >= 0)
    except (TypeError, ValueError):
        return [f"invalid fp16 loss-scaler settings {eff} (from the flags and {where}): numbers are required"]
    if not ok:
        return [f"invalid fp16 loss-scaler settings {eff} (from the flags and {where}): loss_scale >= 0, "
                "initial_scale_power >= 0, min_loss_scale >= 1, loss_scale_window >= 1 and hysteresis >= 1 "
                "are required"]
    if dynamic and 2 ** power < floor:
        errs.append(f"initial loss scale 2**{power} is below the minimum loss scale {floor:g}: raise "
                    "--initial-loss-scale or lower --min-loss-scale")
    return errs


def loss_scale(engine) -> float:
    """The optimizer's current loss scale (1.0 when there is none: fp32/bf16)."""
    scale = getattr(getattr(engine, "optimizer", None), "loss_scale", None)
    return float(scale) if isinstance(scale, (int, float)) else 1.0
