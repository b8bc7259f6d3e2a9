"""Tests for megatron/schedules/.

Every expected LR below is worked out by hand from the formulas of the upstream spec §5.2
(the arithmetic is written next to each number); nothing is compared against the module
under test itself except the round-trip tests, whose point is equality.
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron.config import Config, default_args
from megatron.schedules import (
    LR_SCHEDULES,
    OptimizerParamScheduler,
    ScheduleSpec,
    build_schedule_spec,
    build_scheduler,
    lr_at,
    register_schedule,
    scheduler_increment,
    wd_at,
)

REPO = Path(__file__).resolve().parents[1]
SQRT_HALF = math.sqrt(0.5)  # cos(pi/4) = 0.70710678...


def spec(style: str, **kw) -> ScheduleSpec:
    """max 1.0, min 0.1, warmup W = 10, decay span D = E = 110 (so D - W = 100)."""
    base = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, end_steps=110, decay_style=style)
    base.update(kw)
    return ScheduleSpec(**base)


def make_optimizer(groups: int = 1) -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.AdamW([{"params": [p]} for p in params], lr=123.0, weight_decay=0.5)


def upstream_args(**kw) -> Config:
    """The configuration build_schedule_spec reads, with upstream values for its fields."""
    base = dict(
        lr=2e-4, min_lr=0.0, lr_decay_style="cosine", lr_decay_iters=None, lr_decay_samples=None,
        lr_decay_tokens=None, lr_warmup_fraction=None, lr_warmup_iters=0, lr_warmup_samples=0,
        lr_warmup_tokens=None, train_iters=100, train_samples=None, global_batch_size=8,
        lr_constant_fraction=0.001, lr_cooldown_fraction=0.65, lr_constant_tokens=None,
        lr_cooldown_tokens=None, constant_lr=0.00011, timescale=10.0, lr_constant_plus_cooldown=False,
        lr_constant_plus_cooldown_frac=0.05, seq_length=16, weight_decay=0.1, start_weight_decay=None,
        end_weight_decay=None, weight_decay_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
    )
    base.update(kw)
    return Config.from_args(default_args(**base))


# ---------------------------------------------------------------------------------------
# Pure LR functions
# ---------------------------------------------------------------------------------------


def test_registry_has_exactly_the_styles():
    assert list(LR_SCHEDULES) == ["constant", "linear", "cosine", "inverse-square-root", "infinite-cosine",
                                  "infinite-inv-square-root", "wsd"]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "wsd"])
def test_warmup_is_linear_from_zero(style):
    s = spec(style, wsd_decay_steps=40)
    assert lr_at(s, 0) == 0.0  # max * 0/10
    assert lr_at(s, 3) == pytest.approx(0.3)  # 1.0 * 3/10
    assert lr_at(s, 10) == 1.0  # N == W still warmup: max * 10/10


def test_no_warmup_starts_at_max():
    assert lr_at(spec("cosine", warmup_steps=0), 0) == 1.0  # r = 0 -> coeff 1 -> max
    assert lr_at(spec("linear", warmup_steps=0), 0) == 1.0


def test_linear_table():
    s = spec("linear")
    # r = (N - 10) / 100; lr = 0.1 + (1 - r) * 0.9
    assert lr_at(s, 35) == pytest.approx(0.1 + 0.75 * 0.9)  # r = 0.25 -> 0.775
    assert lr_at(s, 60) == pytest.approx(0.1 + 0.5 * 0.9)  # r = 0.5 -> 0.55
    assert lr_at(s, 110) == pytest.approx(0.1)  # r = 1 -> min
    assert lr_at(s, 111) == 0.1  # N > D -> min
    assert lr_at(s, 10**9) == 0.1


def test_cosine_table():
    s = spec("cosine")
    # r = (N - 10) / 100; lr = 0.1 + 0.5 (1 + cos(pi r)) * 0.9
    assert lr_at(s, 35) == pytest.approx(0.1 + 0.5 * (1 + SQRT_HALF) * 0.9)  # r = .25 -> 0.868198
    assert lr_at(s, 35) == pytest.approx(0.868198, abs=1e-6)
    assert lr_at(s, 60) == pytest.approx(0.1 + 0.5 * (1.0 - 0.1))  # r = 0.5 -> min + 0.5(max - min) = 0.55
    assert lr_at(s, 85) == pytest.approx(0.1 + 0.5 * (1 - SQRT_HALF) * 0.9)  # r = .75 -> 0.231802
    assert lr_at(s, 110) == pytest.approx(0.1)
    assert lr_at(s, 111) == 0.1


def test_inverse_square_root_table():
    s = spec("inverse-square-root", warmup_steps=16, decay_steps=1000, end_steps=1000)
    # lr = max(min, max * sqrt(max(W,1)) / sqrt(max(N,1))), not shifted by the warmup
    assert lr_at(s, 16) == 1.0  # end of warmup
    assert lr_at(s, 64) == pytest.approx(0.5)  # sqrt(16)/sqrt(64) = 4/8
    assert lr_at(s, 400) == pytest.approx(0.2)  # 4/20
    assert lr_at(s, 900) == pytest.approx(4 / 30)  # 0.1333 > min 0.1
    assert lr_at(s, 1001) == 0.1  # N > D -> min
    floored = spec("inverse-square-root", min_lr=0.15, warmup_steps=16, decay_steps=1000, end_steps=1000)
    assert lr_at(floored, 900) == 0.15  # max(0.15, 0.1333)
    no_warmup = spec("inverse-square-root", warmup_steps=0)
    assert lr_at(no_warmup, 0) == 1.0  # sqrt(1)/sqrt(max(0,1))
    assert lr_at(no_warmup, 4) == pytest.approx(0.5)  # 1/sqrt(4)


def test_constant_is_constant_forever():
    s = spec("constant")
    assert [lr_at(s, n) for n in (11, 110, 111, 10**9)] == [1.0] * 4  # no decay guard for constant


def test_constant_plus_cooldown_1_minus_sqrt():
    s = spec("constant", constant_plus_cooldown_steps=40)
    # n = N - 10, T = E - W = 100; cooldown for n in [T - Cc, T) = [60, 100), i.e. N in [70, 110)
    assert lr_at(s, 69) == 1.0
    assert lr_at(s, 70) == 1.0  # 0% of the cooldown: r = 0 -> 1 - sqrt(0) = 1 -> max
    assert lr_at(s, 80) == pytest.approx(0.1 + 0.9 * (1 - 0.5))  # 25%: r = 10/40, sqrt = 0.5 -> 0.55
    assert lr_at(s, 100) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.75)))  # 75% -> 0.220577
    assert lr_at(s, 110) == 0.1  # 100%: n >= T -> min
    assert lr_at(s, 500) == 0.1


def test_upstream_cooldown_tool_starts_the_cooldown_at_R_not_S():
    # tools/cooldown_generator for resume step S = 1000, cooldown R = 100 emits
    # TRAIN_ITERS = S + R and --lr_constant_plus_cooldown_frac = S / (S + R).
    S, R, gbs = 1000, 100, 4
    args = upstream_args(lr_decay_style="constant", lr=2e-4, min_lr=2e-5, train_iters=S + R, global_batch_size=gbs,
                         lr_constant_plus_cooldown=True, lr_constant_plus_cooldown_frac=S / (S + R))
    s = build_schedule_spec(args)
    assert s.decay_steps == 4400 and s.constant_plus_cooldown_steps == 4000  # Cc = frac * D = S * gbs
    # the cooldown starts at N = E - Cc = 400 samples = iteration R = 100, not at S
    assert lr_at(s, 100 * gbs) == 2e-4
    assert lr_at(s, 101 * gbs) < 2e-4
    # at the resume iteration S the LR is already 90% down the 1 - sqrt curve:
    # r = (4000 - 400) / 4000 = 0.9 -> 2e-5 + 1.8e-4 * (1 - sqrt(0.9)) = 2.9237e-5
    assert lr_at(s, S * gbs) == pytest.approx(2e-5 + 1.8e-4 * (1 - math.sqrt(0.9)))
    assert lr_at(s, S * gbs) == pytest.approx(2.9237e-5, rel=1e-4)

    # What was meant, stated directly: the cooldown starts at iteration S (or lasts R iterations).
    for extra in (dict(lr_cooldown_start_iter=S), dict(lr_cooldown_iters=R)):
        s2 = build_schedule_spec(upstream_args(lr_decay_style="constant", lr=2e-4, min_lr=2e-5, train_iters=S + R,
                                               global_batch_size=gbs, lr_constant_plus_cooldown=True, **extra))
        assert s2.constant_plus_cooldown_steps == R * gbs  # 400 samples
        assert lr_at(s2, S * gbs) == 2e-4  # 0%: still max at the resume point
        assert lr_at(s2, (S + 25) * gbs) == pytest.approx(2e-5 + 1.8e-4 * 0.5)  # 25%: 1 - sqrt(.25) = .5
        assert lr_at(s2, (S + R) * gbs) == 2e-5  # 100%
    # --lr-cooldown-iters alone switches the cooldown on for the constant style
    s3 = build_schedule_spec(upstream_args(lr_decay_style="constant", train_iters=S + R, global_batch_size=gbs,
                                           lr_cooldown_iters=R))
    assert s3.constant_plus_cooldown_steps == 400


def test_alcf_cooldown_note_frac_09_is_a_90_percent_cooldown():
    # ALCF/notes/cooldown.md: TRAIN_ITERS=137650 --lr_constant_plus_cooldown_frac=0.9 ("last 10%")
    s = build_schedule_spec(upstream_args(lr_decay_style="constant", train_iters=137650, global_batch_size=1,
                                          lr_constant_plus_cooldown=True, lr_constant_plus_cooldown_frac=0.9))
    assert s.constant_plus_cooldown_steps == 123885  # 0.9 * 137650
    assert lr_at(s, 13765) == 2e-4  # cooldown starts at 137650 - 123885 = 13765, i.e. after 10%
    assert lr_at(s, 13766) < 2e-4


INF = dict(max_lr=1.0, constant_lr=0.5, min_lr=0.05, warmup_steps=10, decay_steps=1010, end_steps=1010,
           cooldown_steps=400, constant_steps=100)  # anneal length = 1010 - 10 - 400 - 100 = 500


def test_infinite_cosine_three_phases():
    s = ScheduleSpec(decay_style="infinite-cosine", **INF)
    # phase 1, n = N - 10, r = n / 400: lr = c + (max - c) * 0.5 (1 + cos(pi r))
    assert lr_at(s, 10) == 1.0  # end of warmup
    assert lr_at(s, 110) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + SQRT_HALF))  # r = .25 -> 0.926777
    assert lr_at(s, 210) == pytest.approx(0.75)  # r = 0.5 -> 0.5 + 0.5 * 0.5
    assert lr_at(s, 410) == pytest.approx(0.5)  # r = 1 -> c
    # phase 2, plateau: n2 = n - 400 <= 100
    assert lr_at(s, 460) == 0.5
    assert lr_at(s, 510) == 0.5
    # phase 3: k = -ln(0.05 / 0.5) / 500 = ln(10)/500; lr = c exp(-k (n2 - Kc))
    assert lr_at(s, 760) == pytest.approx(0.5 / math.sqrt(10))  # n2 - Kc = 250 -> c * 10^-0.5 = 0.158114
    assert lr_at(s, 1010) == pytest.approx(0.05)  # = min at E
    assert lr_at(s, 1011) == 0.05


def test_infinite_inv_square_root_three_phases():
    s = ScheduleSpec(decay_style="infinite-inv-square-root", timescale=3.0, **INF)
    # f(t) = 1/sqrt(1 + 3t) - 1, f(1) = 1/2 - 1 = -0.5; lr = max - (max - c) f(r)/f(1), max - c = 0.5
    # r = 0.5: f = 1/sqrt(2.5) - 1 = -0.367544, f/f(1) = 0.735089 -> lr = 1 - 0.5 * 0.735089 = 0.632456
    assert lr_at(s, 210) == pytest.approx(1 / math.sqrt(2.5))
    assert lr_at(s, 210) == pytest.approx(0.632456, abs=1e-6)
    # r = 0.25: f = 1/sqrt(1.75) - 1 = -0.244071 -> lr = 1 - 0.5 * 0.488143 = 0.755929
    assert lr_at(s, 110) == pytest.approx(0.755929, abs=1e-6)
    assert lr_at(s, 410) == pytest.approx(0.5)  # r = 1 -> c
    assert lr_at(s, 510) == 0.5  # plateau
    assert lr_at(s, 760) == pytest.approx(0.5 / math.sqrt(10))  # same anneal as infinite-cosine
    assert lr_at(s, 1010) == pytest.approx(0.05)


@pytest.mark.parametrize("shape,expected_80,expected_90", [
    ("1-sqrt", 0.1 + 0.9 * 0.5, 0.1 + 0.9 * (1 - SQRT_HALF)),  # r = .25 -> 1 - .5; r = .5 -> 1 - .7071
    ("linear", 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.5),
    ("cosine", 0.1 + 0.9 * 0.5 * (1 + SQRT_HALF), 0.1 + 0.9 * 0.5),
])
def test_wsd_table(shape, expected_80, expected_90):
    s = spec("wsd", wsd_decay_steps=40, wsd_decay_style=shape)  # decay over N in (70, 110]
    assert lr_at(s, 11) == 1.0
    assert lr_at(s, 70) == 1.0
    assert lr_at(s, 80) == pytest.approx(expected_80)  # r = 10/40
    assert lr_at(s, 90) == pytest.approx(expected_90)  # r = 20/40
    assert lr_at(s, 110) == pytest.approx(0.1)
    assert lr_at(s, 111) == 0.1


def test_register_schedule_adds_one_entry():
    name = "test-half-max"
    try:
        @register_schedule(name)
        def half(spec_: ScheduleSpec, step: int) -> float:
            return spec_.max_lr / 2

        s = spec(name)
        assert lr_at(s, 5) == pytest.approx(0.5)  # warmup still applied
        assert lr_at(s, 50) == 0.5
        with pytest.raises(ValueError, match="already registered"):
            register_schedule(name)(half)
    finally:
        LR_SCHEDULES.pop(name, None)



def test_a_registered_style_trains_through_the_flags():
    """Adding a style is one registry entry: registered here alone (formula, validation,
    description), it is accepted by --lr-decay-style, checked at start-up, listed by --help and
    drives the scheduler the trainer builds."""
    from distributed import TINY_MODEL

    from megatron.arguments import ArgumentError, build_parser, parse_args
    from megatron.schedules import ScheduleError

    def no_warmup(s: ScheduleSpec) -> None:
        if s.warmup_steps:
            raise ScheduleError("toy-step takes no warmup; drop --lr-warmup-*")

    name = "toy-step"
    try:
        @register_schedule(name, "--lr until half the decay span, then --min-lr", validate=no_warmup)
        def toy(spec_: ScheduleSpec, step: int) -> float:
            return spec_.max_lr if step <= spec_.decay_steps // 2 else spec_.min_lr

        argv = TINY_MODEL + ["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "10",
                             "--lr", "0.5", "--min-lr", "0.1", "--lr-decay-style", name, "--data-path", "x",
                             "--eval-iters", "0"]
        args = Config.from_args(parse_args(argv, env={"WORLD_SIZE": "1"}))
        assert f"{name}: --lr until half the decay span, then --min-lr" in " ".join(build_parser().format_help().split())
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = build_scheduler(opt, args)
        lrs = []
        for _ in range(10):
            lrs.append(opt.param_groups[0]["lr"])
            sched.step(scheduler_increment(args))
        assert lrs == [0.5] * 6 + [0.1] * 4  # samples 0..10 of a 20-sample span: max up to 10, then min
        with pytest.raises(ArgumentError, match="toy-step takes no warmup"):
            parse_args(argv + ["--lr-warmup-iters", "2"], env={"WORLD_SIZE": "1"})
    finally:
        LR_SCHEDULES.pop(name, None)
    with pytest.raises(SystemExit):  # gone from the registry: refused by the parser
        build_parser().parse_args(["--lr-decay-style", name])

def test_weight_decay_styles():
    # r = N / 100; linear: start + r (end - start); cosine: start + 0.5 (1 + cos(pi (1 - r))) (end - start)
    assert wd_at(0.0, 0.1, 100, "linear", 25) == pytest.approx(0.025)
    assert wd_at(0.0, 0.1, 100, "cosine", 25) == pytest.approx(0.1 * 0.5 * (1 - SQRT_HALF))  # 0.0146447
    assert wd_at(0.0, 0.1, 100, "cosine", 50) == pytest.approx(0.05)
    assert wd_at(0.0, 0.1, 100, "cosine", 100) == pytest.approx(0.1)
    assert wd_at(0.0, 0.1, 100, "linear", 101) == 0.1  # N > incr steps -> end
    assert wd_at(0.1, 0.1, 100, "constant", 7) == 0.1


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,message", [
    (dict(decay_style="nope"), "unknown --lr-decay-style 'nope'"),
    (dict(min_lr=2.0), "--min-lr <= --lr"),
    (dict(warmup_steps=111), "warmup .* longer than the decay span"),
    (dict(decay_style="infinite-cosine", min_lr=0.0), "--min-lr must be > 0 for infinite-\\* schedules"),
    (dict(decay_style="infinite-cosine", constant_lr=2.0, cooldown_steps=10), "--min-lr < --constant-lr <= --lr"),
    (dict(decay_style="infinite-cosine", constant_lr=0.05, cooldown_steps=10), "--min-lr < --constant-lr"),
    (dict(decay_style="infinite-cosine", constant_lr=0.5, cooldown_steps=90, constant_steps=10),
     "final anneal phase.*= 0"),
    (dict(decay_style="infinite-inv-square-root", constant_lr=0.5, cooldown_steps=10, timescale=0.0),
     "--timescale must be > 0"),
    (dict(decay_style="constant", constant_plus_cooldown_steps=101), "cooldown .* longer than the span after"),
    (dict(decay_style="wsd", wsd_decay_steps=0), "wsd needs"),
    (dict(decay_style="wsd", wsd_decay_steps=101), "wsd needs"),
    (dict(decay_style="wsd", wsd_decay_steps=10, wsd_decay_style="exp"), "unknown --lr-wsd-decay-style"),
    (dict(decay_style="cosine", decay_steps=0, end_steps=0, warmup_steps=0), "decay span is 0"),
])
def test_spec_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        spec(kw.pop("decay_style", "cosine"), **kw)


def test_edge_specs_that_are_valid():
    spec("constant", decay_steps=0, end_steps=0, warmup_steps=0)  # constant needs no span
    spec("constant", constant_plus_cooldown_steps=100)  # Cc == D - W: all of it is cooldown
    spec("cosine", warmup_steps=110)  # W == D
    assert lr_at(spec("cosine", warmup_steps=110), 111) == 0.1


def test_scheduler_validation():
    with pytest.raises(ValueError, match="mutually exclusive.*OVERRIDE_CKPT_OPT_PARAM"):
        OptimizerParamScheduler(make_optimizer(), spec("cosine"), 0.1, 0.1, 100,
                                use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=True)
    with pytest.raises(ValueError, match="constant needs --start-weight-decay == --end-weight-decay"):
        OptimizerParamScheduler(make_optimizer(), spec("cosine"), 0.0, 0.1, 100, "constant")
    with pytest.raises(ValueError, match="unknown --weight-decay-incr-style"):
        OptimizerParamScheduler(make_optimizer(), spec("cosine"), 0.0, 0.1, 100, "exp")


# ---------------------------------------------------------------------------------------
# The stateful scheduler
# ---------------------------------------------------------------------------------------


def test_first_step_runs_at_lr_zero_and_step_increment_keyword():
    opt = make_optimizer()
    sched = OptimizerParamScheduler(opt, spec("linear"), 0.0, 0.1, 100, "linear")
    assert sched.num_steps == 0
    assert opt.param_groups[0]["lr"] == 0.0  # constructor ran step(0): warmup 0/10
    assert opt.param_groups[0]["weight_decay"] == 0.0
    sched.step(increment=8)
    assert sched.num_steps == 8
    assert sched.get_lr() == pytest.approx(0.8)  # warmup 8/10
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.008)  # linear wd: 8/100 * 0.1
    sched.step(52)  # N = 60: linear r = 0.5 -> 0.55
    assert sched.get_lr() == pytest.approx(0.55)
    assert sched.get_last_lr() == [pytest.approx(0.55)]
    assert sched.get_wd() == pytest.approx(0.06)


def test_step_without_increment_raises_typeerror_for_deepspeed_fallback():
    # DeepSpeed's pipeline engine calls step() with no kwargs and, on TypeError, retries with
    # step(train_batch_size()); a default increment of 1 would silently count 1 sample/iteration.
    sched = OptimizerParamScheduler(make_optimizer(), spec("linear"), 0.1, 0.1, 100)
    with pytest.raises(TypeError):
        sched.step()
    sched.step(4)  # positional works (that is the fallback call)
    assert sched.num_steps == 4


def test_lr_mult_and_wd_mult_are_applied_per_group():
    opt = make_optimizer(groups=3)
    opt.param_groups[1]["lr_mult"] = 2.0
    opt.param_groups[2]["wd_mult"] = 0.0
    sched = OptimizerParamScheduler(opt, spec("cosine"), 0.1, 0.1, 100)
    sched.step(60)  # cosine r = 0.5 -> 0.55
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.55, 1.1, 0.55])
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.1, 0.1, 0.0])
    assert sched.get_last_lr() == pytest.approx([0.55, 1.1, 0.55])


ROUND_TRIP_SPECS = {
    "constant": spec("constant", constant_plus_cooldown_steps=40),
    "linear": spec("linear"),
    "cosine": spec("cosine"),
    "inverse-square-root": spec("inverse-square-root"),
    "infinite-cosine": ScheduleSpec(decay_style="infinite-cosine", **INF),
    "infinite-inv-square-root": ScheduleSpec(decay_style="infinite-inv-square-root", timescale=3.0, **INF),
    "wsd": spec("wsd", wsd_decay_steps=40, wsd_decay_style="cosine"),
}


@pytest.mark.parametrize("style", list(ROUND_TRIP_SPECS))
def test_state_round_trip_reproduces_the_next_50_lrs(style):
    s = ROUND_TRIP_SPECS[style]
    a = OptimizerParamScheduler(make_optimizer(), s, 0.0, 0.1, 500, "cosine")
    for _ in range(6):
        a.step(3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as DeepSpeed stores it in mp_rank_00_model_states.pt
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    # A new run with different command-line values (every curve field changed); the ALCF
    # default --use-checkpoint-opt_param-scheduler must reproduce the saved curve exactly,
    # including the fields upstream does not save (end_steps, constant_lr, Kc, Cd, Cc, timescale).
    other = ScheduleSpec(max_lr=3.0, min_lr=0.01, warmup_steps=0, decay_steps=5000, end_steps=5000,
                         decay_style="infinite-cosine", constant_lr=0.02, constant_steps=7, cooldown_steps=9,
                         timescale=1.0, wsd_decay_steps=3, wsd_decay_style="linear")
    b = OptimizerParamScheduler(make_optimizer(), other, 0.1, 0.1, 99, "constant",
                                use_checkpoint_opt_param_scheduler=True)
    b.load_state_dict(sd)
    assert b.num_steps == 18 and b.spec == s
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]  # re-applied at load
    la, lb, wa, wb = [], [], [], []
    for _ in range(50):
        a.step(3)
        b.step(3)
        la.append(a.optimizer.param_groups[0]["lr"])
        lb.append(b.optimizer.param_groups[0]["lr"])
        wa.append(a.get_wd())
        wb.append(b.get_wd())
    assert la == lb and wa == wb  # exact
    assert len(set(la)) > 5  # the compared stretch is not trivially flat


def test_state_dict_keys():
    sched = OptimizerParamScheduler(make_optimizer(), spec("cosine"), 0.1, 0.1, 100)
    sd = sched.state_dict()
    upstream = {"max_lr", "lr_warmup_steps", "lr_warmup_tokens", "num_steps", "num_tokens", "lr_decay_style",
                "lr_decay_steps", "lr_decay_tokens", "min_lr", "start_wd", "end_wd", "wd_incr_style", "wd_incr_steps"}
    extra = {"end_steps", "constant_lr", "lr_constant_steps", "lr_cooldown_steps", "lr_constant_plus_cooldown_steps",
             "timescale", "wsd_decay_steps", "wsd_decay_style", "unit"}
    assert set(sd) == upstream | extra
    assert sd["lr_warmup_tokens"] is None and sd["lr_decay_tokens"] is None and sd["unit"] == "samples"


def _saved(max_lr=1.0, num=40):
    a = OptimizerParamScheduler(make_optimizer(), spec("cosine", max_lr=max_lr), 0.1, 0.1, 100)
    a.step(num)
    return a.state_dict()


@pytest.mark.parametrize("override,use_ckpt,expected_max", [(True, False, 2.0), (False, True, 1.0)])
def test_precedence_override_and_use_checkpoint(override, use_ckpt, expected_max):
    sd = _saved(max_lr=1.0, num=40)
    b = OptimizerParamScheduler(make_optimizer(), spec("cosine", max_lr=2.0), 0.1, 0.1, 100,
                                use_checkpoint_opt_param_scheduler=use_ckpt, override_opt_param_scheduler=override)
    b.load_state_dict(sd)
    assert b.num_steps == 40  # the counter always comes from the checkpoint
    assert b.spec.max_lr == expected_max
    # N = 40: cosine r = 0.3 -> min + 0.5 (1 + cos(0.3 pi)) (max - min)
    assert b.get_lr() == pytest.approx(0.1 + 0.5 * (1 + math.cos(0.3 * math.pi)) * (expected_max - 0.1))


def test_precedence_neither_flag_requires_equal_values():
    sd = _saved(max_lr=1.0, num=40)
    same = OptimizerParamScheduler(make_optimizer(), spec("cosine"), 0.1, 0.1, 100)
    same.load_state_dict(sd)
    assert same.num_steps == 40
    differs = OptimizerParamScheduler(make_optimizer(), spec("cosine", max_lr=2.0, min_lr=0.2), 0.1, 0.1, 100)
    with pytest.raises(ValueError) as err:
        differs.load_state_dict(sd)
    msg = str(err.value)
    assert "max_lr (command line 2.0, checkpoint 1.0)" in msg and "min_lr" in msg and "lr_decay_steps" not in msg
    assert "--override-opt_param-scheduler" in msg and "--use-checkpoint-opt_param-scheduler" in msg
    assert differs.num_steps == 0  # nothing changed by the failed load


def test_legacy_keys():
    legacy = {"start_lr": 1.0, "min_lr": 0.1, "warmup_iter": 10, "end_iter": 110, "decay_style": "linear",
              "num_iters": 60}
    b = OptimizerParamScheduler(make_optimizer(), spec("cosine", max_lr=5.0, warmup_steps=0, decay_steps=900,
                                                       end_steps=110), 0.1, 0.1, 100,
                                use_checkpoint_opt_param_scheduler=True)
    b.load_state_dict(legacy)
    assert (b.spec.max_lr, b.spec.warmup_steps, b.spec.decay_steps, b.spec.decay_style) == (1.0, 10, 110, "linear")
    assert b.num_steps == 60 and b.get_lr() == pytest.approx(0.55)  # linear r = 0.5
    # the other legacy spellings, plus an upstream dict (token keys None, float warmup)
    upstream = {"max_lr": 1.0, "min_lr": 0.1, "warmup_steps": 10.0, "decay_steps": 110, "lr_decay_style": "linear",
                "num_steps": 35, "num_tokens": 12345, "lr_warmup_tokens": None, "lr_decay_tokens": None,
                "start_wd": 0.1, "end_wd": 0.1, "wd_incr_style": "constant", "wd_incr_steps": 100}
    c = OptimizerParamScheduler(make_optimizer(), spec("linear"), 0.1, 0.1, 100)  # neither flag: all equal
    c.load_state_dict(upstream)
    assert c.num_steps == 35 and c.get_lr() == pytest.approx(0.775)  # r = 0.25
    assert c.spec.end_steps == 110  # not in upstream state: CLI value kept


def test_token_unit():
    args = upstream_args(lr_decay_style="linear", lr=1.0, min_lr=0.0, lr_decay_tokens=64_000, lr_warmup_tokens=6_400,
                         seq_length=16, global_batch_size=8, train_iters=1000)
    assert scheduler_increment(args) == 128  # 8 samples * 16 tokens per iteration
    sched = build_scheduler(make_optimizer(), args)
    assert sched.unit == "tokens" and sched.spec.decay_steps == 64_000 and sched.spec.warmup_steps == 6_400
    assert sched.wd_incr_steps == 1000 * 8 * 16
    sched.step(increment=50 * 128)  # 6400 tokens: end of warmup
    assert sched.get_lr() == 1.0
    sched.step(increment=225 * 128)  # 35200 tokens: r = (35200 - 6400) / 57600 = 0.5
    assert sched.get_lr() == pytest.approx(0.5)
    sd = sched.state_dict()
    assert sd["unit"] == "tokens" and sd["num_tokens"] == 35200 and sd["lr_decay_tokens"] == 64_000
    # warmup given in iterations is converted to tokens, no mode switch half-way
    s2 = build_schedule_spec(upstream_args(lr_decay_tokens=64_000, lr_warmup_iters=5, seq_length=16))
    assert s2.warmup_steps == 5 * 8 * 16
    # an upstream token-mode checkpoint: counters from num_tokens / *_tokens
    upstream_tok = {"max_lr": 1.0, "min_lr": 0.0, "lr_warmup_steps": 400, "lr_warmup_tokens": 6400,
                    "lr_decay_steps": 8000, "lr_decay_tokens": 64_000, "lr_decay_style": "linear",
                    "num_steps": 2200, "num_tokens": 35200}
    fresh = build_scheduler(make_optimizer(), args)
    fresh.load_state_dict(upstream_tok)
    assert fresh.num_steps == 35200 and fresh.get_lr() == pytest.approx(0.5)
    # samples checkpoint into a token run: refused, the counter cannot be converted
    with pytest.raises(ValueError, match="counts samples but this run counts tokens"):
        fresh.load_state_dict(_saved())


# ---------------------------------------------------------------------------------------
# Builder (units of §5.1)
# ---------------------------------------------------------------------------------------


def test_builder_iteration_units():
    s = build_schedule_spec(upstream_args(train_iters=100, global_batch_size=8, lr_warmup_fraction=0.01,
                                          lr_decay_style="infinite-cosine", min_lr=1e-5))
    assert s.unit == "samples"
    assert s.decay_steps == s.end_steps == 800  # D = train_iters * GBS
    assert s.warmup_steps == 8  # 0.01 * 800
    assert s.constant_steps == 1  # 0.001 * 800 = 0.8 -> 1
    assert s.cooldown_steps == 520  # 0.65 * 800
    s = build_schedule_spec(upstream_args(train_iters=100, lr_decay_iters=50, lr_warmup_iters=5))
    assert (s.decay_steps, s.warmup_steps) == (400, 40)  # 50 * 8, 5 * 8
    s = build_schedule_spec(upstream_args(lr_decay_style="constant", lr_constant_plus_cooldown=True))
    assert s.constant_plus_cooldown_steps == 40  # 0.05 * 800
    s = build_schedule_spec(upstream_args(lr_decay_style="constant"))
    assert s.constant_plus_cooldown_steps == 0


def test_builder_sample_units():
    s = build_schedule_spec(upstream_args(train_iters=None, train_samples=1000, lr_warmup_samples=10))
    assert (s.decay_steps, s.warmup_steps) == (1000, 10)
    s = build_schedule_spec(upstream_args(train_iters=None, train_samples=1000, lr_decay_samples=600,
                                          lr_warmup_fraction=0.1))
    assert (s.decay_steps, s.warmup_steps) == (600, 60)


def test_builder_wsd():
    s = build_schedule_spec(upstream_args(lr_decay_style="wsd", lr_wsd_decay_iters=20, lr_wsd_decay_style="minus_sqrt"))
    assert (s.wsd_decay_steps, s.wsd_decay_style) == (160, "1-sqrt")
    s = build_schedule_spec(upstream_args(lr_decay_style="wsd", lr_cooldown_start_iter=90))
    assert s.wsd_decay_steps == 80  # (100 - 90) * 8
    with pytest.raises(ValueError, match="wsd needs the decay length"):
        build_schedule_spec(upstream_args(lr_decay_style="wsd"))


@pytest.mark.parametrize("kw,message", [
    (dict(lr_warmup_fraction=0.1, lr_warmup_iters=3), "either --lr-warmup-fraction or"),
    (dict(lr_decay_style="constant", lr_cooldown_iters=3, lr_cooldown_start_iter=5), "either --lr-cooldown-iters"),
    (dict(lr_decay_style="constant", lr_cooldown_start_iter=100), "at or after the end"),
    (dict(lr_decay_style="cosine", lr_constant_plus_cooldown=True), "apply to --lr-decay-style constant"),
    (dict(lr_decay_style="infinite-cosine"), "--min-lr must be > 0 for infinite"),
    (dict(lr=None), "--lr is required"),
    (dict(train_iters=None), "needs --train-iters or --train-samples"),
    (dict(lr_decay_tokens=1000, seq_length=None), "need --seq-length"),
])
def test_builder_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        build_schedule_spec(upstream_args(**kw))


def test_build_scheduler_wd_and_flags():
    args = upstream_args(weight_decay=0.1, start_weight_decay=0.0, end_weight_decay=0.1,
                         weight_decay_incr_style="linear", use_checkpoint_opt_param_scheduler=True,
                         lr_warmup_iters=1)
    opt = make_optimizer()
    sched = build_scheduler(opt, args)
    assert sched.wd_incr_steps == 800 and sched.use_checkpoint_opt_param_scheduler
    assert opt.param_groups[0]["lr"] == 0.0  # first step at LR 0 (warmup 8 samples)
    sched.step(scheduler_increment(args) * 50)  # N = 400: wd = 400/800 * 0.1
    assert sched.get_wd() == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------
# DeepSpeed drives the scheduler (single gloo process, in a subprocess)
# ---------------------------------------------------------------------------------------

DS_SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import torch, deepspeed
    from megatron.deepspeed_compat import skip_shm_inference_op
    from megatron.schedules import OptimizerParamScheduler, ScheduleSpec, lr_at

    skip_shm_inference_op()  # as the trainer: no C++ all-reduce op compiled in a fresh environment
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0}}

    def make(max_lr, use_ckpt=False):
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.0)
        spec = ScheduleSpec(max_lr=max_lr, min_lr=0.0, warmup_steps=4, decay_steps=20, end_steps=20,
                            decay_style="linear")
        sched = OptimizerParamScheduler(opt, spec, 0.0, 0.0, 20, use_checkpoint_opt_param_scheduler=use_ckpt)
        engine, _, _, ds_sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
        return engine, sched, ds_sched

    engine, sched, ds_sched = make(0.1)
    out = {"same_object": ds_sched is sched, "num_steps": [], "opt_lr": [], "engine_lr": [], "weight_changed": []}
    x = torch.ones(2, 4)
    for i in range(4):
        before = engine.module.weight.detach().clone()
        loss = engine(x).pow(2).sum()
        engine.backward(loss)
        if i < 3:
            engine.step(lr_kwargs={"increment": 2})
        else:
            engine.step()  # no kwargs: TypeError -> DeepSpeed retries step(train_batch_size())
        out["weight_changed"].append(bool((engine.module.weight != before).any()))
        out["num_steps"].append(sched.num_steps)
        out["opt_lr"].append(engine.optimizer.param_groups[0]["lr"])
        out["engine_lr"].append(engine.get_lr()[0])
    ckpt = tempfile.mkdtemp()
    engine.save_checkpoint(ckpt, tag="t")
    engine2, sched2, _ = make(0.5, use_ckpt=True)  # different CLI max_lr; the checkpoint wins
    engine2.load_checkpoint(ckpt, tag="t")
    out["loaded_num_steps"] = sched2.num_steps
    out["loaded_max_lr"] = sched2.spec.max_lr
    out["loaded_opt_lr"] = engine2.optimizer.param_groups[0]["lr"]
    print("RESULT " + json.dumps(out))
    """
)


def _free_port() -> int:
    from distributed import free_port  # noqa: PLC0415

    return free_port()


@pytest.mark.slow
def test_deepspeed_engine_drives_the_scheduler():
    pytest.importorskip("deepspeed")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run([sys.executable, "-c", DS_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["same_object"]
    assert out["num_steps"] == [2, 4, 6, 8]  # +2 per engine.step, also via the no-kwargs fallback
    # linear, max 0.1, W = 4, D = 20: N = 2 -> 0.05 (warmup), 4 -> 0.1, 6 -> r = 2/16 -> 0.0875, 8 -> 0.075
    expected = [0.05, 0.1, 0.1 * (1 - 2 / 16), 0.1 * (1 - 4 / 16)]
    assert out["opt_lr"] == pytest.approx(expected)
    assert out["engine_lr"] == pytest.approx(expected)
    # the first optimizer step ran at LR 0 (set by the constructor's step(0)), the next ones did not
    assert out["weight_changed"] == [False, True, True, True]
    assert out["loaded_num_steps"] == 8 and out["loaded_max_lr"] == 0.1
    assert out["loaded_opt_lr"] == pytest.approx(0.075)
