"""fp16 with DeepSpeed's loss scaler (megatron/fp16.py): flag mapping and refusals, the overflow
classification of megatron/observability/numerics.py, the ZeRO scale-growth fix, the fp16 kernels, and real
2-rank runs (ZeRO 1/2/3, dynamic and static scaling, a forced overflow, save/resume, and the
launcher's Polaris defaults).

The bound of fp16 against fp32 (`FP16_LOSS_BOUND`): fp16 keeps 11 significant bits, unit roundoff
u = 2**-11 = 4.9e-4. DeepSpeed keeps fp32 master weights, so the runs differ only by the fp16
rounding of the forward/backward. The loss is computed in fp32 from the fp16 logits; cross-entropy
changes by at most 2 max|dz| when the logits z move by dz, and each logit of the tiny model carries
three fp16 roundings (its input h, the weight, the output) of a dot product whose magnitude is at
most |h|_2 |w|_2 = 8 x 8 x 0.02 = 1.28 (RMS-normalized h of width 64, init std 0.02): |dz| <= 3u x 1.28,
so |d loss| <= 2 x 3u x 1.28 = 3.8e-3 at equal weights, per token and so for their mean. With the
earlier layers and 5 steps of updates we allow 2x that: 7.5e-3. (Measured: <= 3e-5.)
Scaling by a power of two is exact in floating point, so a run whose loss scale grows equals one
whose scale stays constant up to the ZeRO stages' reduction order (`CROSS_STAGE`): the check that
catches a step unscaled by the wrong scale (DeepSpeed's growth before unscaling moved the loss by 9.5e-4).
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from distributed import ROOT, TINY_MODEL, env_for, make_dataset, run_trainer
from megatron.checkpoint.io import torch_load
from megatron.deepspeed_compat.engine import defer_loss_scale_growth
from megatron.fp16 import SCALER_FLAGS, fp16_block, fp16_problems, loss_scale
from megatron.observability.numerics import NumericalFaultError, NumericsGuard
from megatron.config import Config, default_args

U16 = 2.0 ** -11
FP16_LOSS_BOUND = 2 * (2 * 3 * U16 * 8 * 8 * 0.02)  # see the module docstring
# fp16 at ZeRO-1 vs ZeRO-2/3: the same math, but the stages reduce the fp16 gradients in other bucket
# orders, so a gradient can differ by one fp16 rounding. Measured 1.4e-5 after 5 steps; DeepSpeed's
# scale growth before unscaling (fixed in megatron/fp16.py) moved the loss by 9.5e-4, 10x this bound.
CROSS_STAGE = 1e-4


# ------------------------------------------------------------------------------------------------ flags
def ns(**kw) -> Config:
    base = dict(fp16=True, bf16=False, deepspeed_config=None, pipeline_model_parallel_size=1,
                **{dest: None for dest in SCALER_FLAGS})
    return Config.from_args(default_args(**{**base, **kw}))


def write_json(tmp_path, cfg: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_flags_map_to_the_deepspeed_block_and_override_the_launcher_json(tmp_path):
    launcher = {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    args = ns(deepspeed_config=write_json(tmp_path, {"fp16": launcher}))
    assert fp16_block(args.precision, launcher) == launcher  # no flag: the launcher's block as it is
    args = ns(initial_loss_scale=2.0 ** 32, min_loss_scale=4.0, loss_scale_window=50.0, hysteresis=1)
    assert fp16_block(args.precision, launcher) == {"enabled": True, "loss_scale": 0, "initial_scale_power": 32,
                                          "loss_scale_window": 50, "hysteresis": 1, "min_loss_scale": 4}
    assert fp16_block(ns(loss_scale=1024.0).precision, launcher)["loss_scale"] == 1024.0
    assert fp16_block(ns(fp16=False).precision, launcher) == {**launcher, "enabled": False}  # bf16/fp32 run, fp16 JSON
    for a in (args, ns(loss_scale=1024.0), ns()):
        assert fp16_problems(a.replace(zero_stage=1)) == []
    # the start-up table's line: flag > the launcher JSON > DeepSpeed's default
    from megatron.fp16 import describe

    json_args = ns(deepspeed_config=write_json(tmp_path, {"fp16": {**launcher, "loss_scale_window": 500}}), hysteresis=1)
    assert describe(json_args) == "dynamic: initial 2**16, window 500, hysteresis 1, min 1"
    assert describe(ns(loss_scale=1024.0)) == "static 1024"


def test_build_ds_config_takes_the_fp16_block_and_drops_the_bf16_loss_scale(tmp_path):
    """What the launcher writes for DTYPE=fp16 (upstream's layout), through build_ds_config."""
    from megatron.training import build_ds_config

    cfg = {"fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2,
                    "min_loss_scale": 1}, "bfloat16": {"enabled": False, "loss_scale": 1.0}}
    args = ns(deepspeed_config=write_json(tmp_path, cfg), hysteresis=1,
              global_batch_size=8, micro_batch_size=2, num_micro_batches=2, clip_grad=1.0,
              zero_stage=1, data_parallel_size=2, ds_sequence_parallel_size=1, universal_checkpoint=False,
              rank=0, flops_profiler_step=None, cpu_optimizer=False)
    out = build_ds_config(args)
    assert out["fp16"] == {**cfg["fp16"], "hysteresis": 1}  # the flag wins, the rest from the file
    assert out["bf16"] == {"enabled": False}  # DeepSpeed's bf16 block refuses a loss_scale


@pytest.mark.parametrize("kw,stage,message", [
    (dict(fp16=False, loss_scale=128.0, hysteresis=1), 1,
     "--loss-scale, --hysteresis: loss scaling applies to fp16 only; add --fp16 (DTYPE=fp16) or drop them"),
    (dict(), 0, "--fp16 at ZeRO stage 0 is refused: DeepSpeed's stage 0 fp16 optimizer never scales the loss"),
    (dict(pipeline_model_parallel_size=2), 1, "--fp16 with pipeline parallelism (PP > 1) is not tested here yet"),
    (dict(loss_scale=-1.0), 1, "--loss-scale must be a finite number >= 0 (0 = dynamic loss scaling; got -1.0)"),
    (dict(initial_loss_scale=1000.0), 1, "--initial-loss-scale must be a power of two between 1 and 2**127"),
    (dict(min_loss_scale=0.5), 1, "--min-loss-scale must be a whole number >= 1"),
    (dict(loss_scale_window=0.0), 1, "--loss-scale-window must be a whole number >= 1 (got 0.0)"),
    (dict(hysteresis=0), 1, "--hysteresis must be >= 1 (got 0)"),
    (dict(loss_scale=1024.0, hysteresis=2), 1,
     "--hysteresis only apply to dynamic loss scaling, but --loss-scale 1024 is static; drop them or drop --loss-scale"),
    (dict(initial_loss_scale=4.0, min_loss_scale=8.0), 1,
     "initial loss scale 2**2 is below the minimum loss scale 8: raise --initial-loss-scale or lower --min-loss-scale"),
])
def test_bad_values_refused_with_the_fix(kw, stage, message):
    errs = fp16_problems(ns(**kw, zero_stage=stage))
    assert len(errs) == 1 and errs[0].startswith(message), errs


def test_bad_launcher_json_refused(tmp_path):
    args = ns(deepspeed_config=write_json(tmp_path, {"fp16": {"enabled": True, "loss_scale_window": 0}}))
    (err,) = fp16_problems(args.replace(zero_stage=1))
    assert "invalid fp16 loss-scaler settings" in err and "ds.json" in err and "loss_scale_window >= 1" in err


# ------------------------------------------------------------------------------------------------ numerics
class FakeEngine:
    """What NumericsGuard reads: the boundary flag, skipped_steps, the module's gradients."""

    def __init__(self):
        self.skipped_steps = 0
        self.module = torch.nn.Linear(2, 2)
        self.module.weight.grad = torch.full((2, 2), float("inf"))  # fp16 scaled grads that overflowed
        self.optimizer, self.lr_scheduler = torch.optim.SGD(self.module.parameters(), lr=1.0), None

    def is_gradient_accumulation_boundary(self):
        return True


def test_fp16_overflow_is_deepspeeds_skip_not_a_fault():
    """fp16: the guard hands every step to DeepSpeed (no gradient scan); a skip with a finite loss is an
    overflow (not toward --max-skipped-iterations), one with a non-finite loss is a fault."""
    g, engine = NumericsGuard(max_skipped=1, fp16=True), FakeEngine()
    calls = []

    def ds_step(skip: bool):
        def step():
            calls.append(skip)
            engine.skipped_steps += skip
        return step

    for it in (1, 2, 3):  # DeepSpeed skips three overflows in a row: the loss was finite each time
        g.step(engine, torch.tensor(6.0), ds_step(True))
        assert g.end_iteration(it, 6.0) is False
    assert calls == [True] * 3 and (g.overflows, g.skipped_in_a_row, g.skipped_total) == (3, 0, 0)
    g.step(engine, torch.tensor(float("nan")), ds_step(True))  # a NaN loss: a numerical fault
    assert calls[-1] is True and g.end_iteration(4, float("nan")) is True  # --max-skipped-iterations 1
    assert (g.overflows, g.skipped_in_a_row) == (3, 1)
    # fp32/bf16: the same infinite gradient makes the guard skip the step itself
    g32, engine.skipped_steps = NumericsGuard(), 0
    g32.step(engine, torch.tensor(6.0), ds_step(False))
    assert engine.skipped_steps == 1 and g32.end_iteration(1, 6.0) is False and g32.skipped_total == 1


def test_overflow_at_the_minimum_scale_is_a_numerical_fault():
    def step():
        raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")

    with pytest.raises(NumericalFaultError, match="overflow even at the minimum loss scale"):
        NumericsGuard(fp16=True).step(FakeEngine(), torch.tensor(1.0), step)


def test_scale_grows_only_after_the_update():
    """A ZeRO-style step that updates the scale, then unscales: with the fix it unscales by the scale
    the gradients were multiplied with, and the scale has doubled afterwards."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    class ZeroLike:
        def __init__(self):
            self.loss_scaler = DynamicLossScaler(init_scale=8.0, scale_window=1, min_scale=1,
                                                 delayed_shift=1, consecutive_hysteresis=False)
            self.unscaled_by = []

        def _update_scale(self, overflow):
            self.loss_scaler.update_scale(overflow)

        def step(self):
            self._update_scale(False)
            self.unscaled_by.append(self.loss_scaler.cur_scale)

    bare, fixed = ZeroLike(), ZeroLike()
    defer_loss_scale_growth(fixed)
    for opt in (bare, fixed):
        opt.step()  # cur_iter 0: no growth
        opt.step()  # cur_iter 1: one stable step -> the window of 1 is complete: the scale doubles
    assert bare.unscaled_by == [8.0, 16.0]  # DeepSpeed: the second step divided 8x-scaled gradients by 16
    assert fixed.unscaled_by == [8.0, 8.0] and fixed.loss_scaler.cur_scale == 16.0
    assert loss_scale(SimpleNamespace(optimizer=SimpleNamespace(loss_scale=16.0))) == 16.0
    assert loss_scale(SimpleNamespace(optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1))) == 1.0


# ------------------------------------------------------------------------------------------------ kernels
def test_model_kernels_in_fp16_and_the_loss_in_fp32():
    """The tiny model with fp16 weights (as DeepSpeed casts it): sdpa attention, RMSNorm, RoPE, the
    SwiGLU MLP run in fp16; the loss is fp32 cross-entropy of the fp16 logits (Megatron's), and it
    is within the derived bound of the fp64 model's loss."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.model import GPTConfig, GPTModel

    cfg = GPTConfig(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    ffn_hidden_size=128, max_position_embeddings=64, normalization="rmsnorm", swiglu=True,
                    use_rotary_position_embeddings=True, untie_embeddings_and_output_weights=True,
                    add_bias_linear=False)
    torch.manual_seed(0)
    model = GPTModel(cfg)
    model.init_weights(seed=1)
    ref = GPTModel(cfg).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    half = model.half()
    tokens = torch.randint(0, 500, (2, 32))
    labels = torch.roll(tokens, -1, 1)
    logits = half(tokens)
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    losses = half(tokens, labels=labels)
    assert losses.dtype == torch.float32
    assert torch.equal(losses, vocab_parallel_cross_entropy(logits, labels))  # fp32 CE of the fp16 logits
    want = ref(tokens, labels=labels).mean().item()
    assert abs(losses.mean().item() - want) <= FP16_LOSS_BOUND / 2, (losses.mean().item(), want)
    losses.mean().backward()
    assert all(p.grad.dtype == torch.float16 and torch.isfinite(p.grad).all() for p in half.parameters())


# ------------------------------------------------------------------------------------------------ 2 ranks
ITERS = 5


def records(path: str) -> dict[int, dict]:
    with open(path) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if "lm_loss" in r}


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("fp16-data")), n_docs=120)


@pytest.fixture(scope="module")
def runs(data_list, tmp_path_factory):
    """fp32 ZeRO-1 reference; fp16 ZeRO-1 dynamic; fp16 ZeRO-2 dynamic with the scale growing every
    2 steps; fp16 ZeRO-3 static 1024 with an overflow forced on rank 1 at iteration 3, saved every step."""
    root = tmp_path_factory.mktemp("fp16-runs")
    cases = {
        "fp32-z1": ("1", []),
        "fp16-z1": ("1", ["--fp16"]),
        "fp16-z2-grow": ("2", ["--fp16", "--loss-scale-window", "2", "--tensorboard-dir", str(root / "grow-tb"),
                               "--no-log-loss-scale-to-tensorboard"]),
        "fp16-z3-static": ("3", ["--fp16", "--loss-scale", "1024", "--save", str(root / "static" / "ckpt"),
                                 "--save-interval", "1"]),
    }
    out = {}
    for name, (stage, extra) in cases.items():
        metrics = str(root / name / "metrics.jsonl")
        run_trainer(TINY_MODEL + [
            "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", str(root / "cache"),
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(ITERS),
            "--lr", "0.003", "--min-lr", "0.0003", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
            "--clip-grad", "1.0", "--weight-decay", "0.1", "--log-interval", "1", "--eval-iters", "0",
            "--num-workers", "0", "--zero-stage", stage, "--keep-zero-stage", "--deepspeed", "--seed", "1234",
            "--metrics-file", metrics, *extra], nproc=2, launcher="ranks",
            env_extra={"MEGATRON_TEST_FAULTS": "overflow@3:1" if "static" in name else ""})
        out[name] = records(metrics)
    out["static-ckpt"] = str(root / "static" / "ckpt")
    out["tb"] = {"static": tb_scalars(str(root / "static" / "ckpt" / "tensorboard")),
                 "grow": tb_scalars(str(root / "grow-tb"))}
    return out


def tb_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(directory, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_fp16_zero_stages_match_fp32(runs):
    ref, z1, z2 = runs["fp32-z1"], runs["fp16-z1"], runs["fp16-z2-grow"]
    assert sorted(z1) == sorted(z2) == list(range(1, ITERS + 1))
    for i in range(1, ITERS + 1):
        for run in (z1, z2):
            assert abs(run[i]["lm_loss"] - ref[i]["lm_loss"]) <= FP16_LOSS_BOUND, (i, run[i]["lm_loss"], ref[i]["lm_loss"])
            assert run[i]["lr"] == ref[i]["lr"] and run[i]["skipped_iterations"] == 0
        # the growing scale changes nothing (powers of two are exact); only ZeRO-2's reduction order differs
        assert abs(z2[i]["lm_loss"] - z1[i]["lm_loss"]) <= CROSS_STAGE, (i, z2[i]["lm_loss"], z1[i]["lm_loss"])
    assert any(z1[i]["lm_loss"] != ref[i]["lm_loss"] for i in z1)  # really fp16, not fp32 again
    assert [z1[i]["loss_scale"] for i in z1] == [65536.0] * ITERS  # DeepSpeed's initial 2**16, window 1000
    # window 2: the scale doubles after every 2 overflow-free steps (steps 3 and 5)
    assert [z2[i]["loss_scale"] for i in z2] == [65536.0, 65536.0, 131072.0, 131072.0, 262144.0]
    assert [r["loss_scale"] for r in ref.values()] == [1.0] * ITERS
    tb = runs["tb"]["grow"]  # --no-log-loss-scale-to-tensorboard
    assert "loss/loss_scale" not in tb and [v for _, v in tb["training/skipped_iterations"]] == [0.0] * ITERS


def tensors(obj, path: str = "") -> dict:
    """Every tensor inside a (nested) checkpoint object, by its path."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{path}/{key}").items()}


@pytest.mark.slow
def test_static_scale_and_forced_overflow_skipped(runs):
    """ZeRO-3, --loss-scale 1024: the scale stays 1024; the overflow on one rank skips the step on
    both: weights and optimizer state unchanged, the LR schedule not advanced, counted once."""
    st, z1 = runs["fp16-z3-static"], runs["fp16-z1"]
    assert [st[i]["loss_scale"] for i in st] == [1024.0] * ITERS
    assert [st[i]["skipped_iterations"] for i in st] == [0, 0, 1, 0, 0]
    assert [st[i]["skipped_iterations_total"] for i in st] == [0, 0, 1, 1, 1]
    assert st[3]["lr"] == st[2]["lr"] and st[4]["lr"] == z1[3]["lr"]  # no scheduler step at the skip
    assert math.isinf(st[3]["grad_norm"]) and st[3]["nan_iterations"] == 0
    tb = runs["tb"]["static"]
    assert tb["loss/loss_scale"] == [(i, 1024.0) for i in range(1, ITERS + 1)]
    assert [v for _, v in tb["training/skipped_iterations"]] == [0.0, 0.0, 1.0, 0.0, 0.0]
    for i in (1, 2):
        assert abs(st[i]["lm_loss"] - z1[i]["lm_loss"]) <= CROSS_STAGE
    ckpt = runs["static-ckpt"]
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(ckpt, "global_step3", "*.pt")))
    assert len([f for f in files if "optim_states" in f]) == 2  # ZeRO-3 shards: fp32 master + Adam state
    state = {t: {f: tensors(torch_load(os.path.join(ckpt, f"global_step{t}", f))) for f in files} for t in (2, 3, 4)}
    for f in files:  # the skipped step changed no tensor: weights, fp32 masters, moments, step counts
        assert state[2][f].keys() == state[3][f].keys()
        assert all(torch.equal(state[2][f][k], state[3][f][k]) for k in state[2][f]), f
    assert any(not torch.equal(state[3][f][k], state[4][f][k]) for f in files for k in state[3][f])  # the next did
    masters = [v for f in files if "optim_states" in f for v in state[3][f].values() if v.dtype == torch.float32]
    assert masters  # the fp32 master weights and moments are among the unchanged tensors


# ------------------------------------------------------------------------------------------------ launcher
POLARIS_HOST = "x3005c0s7b0n0"


def launcher_env(workdir, data_list: str, **extra) -> dict:
    env = env_for(1)
    env.pop("DS_ACCELERATOR", None)
    for var in ("OMP_NUM_THREADS", "PBS_NODEFILE", "HOSTFILE", "SLURM_JOB_ID", "PBS_JOBID", MEGATRON_FAULTS):
        env.pop(var, None)
    env.update(WORKING_DIR=str(workdir), VIRTUAL_ENV=sys.prefix, PYTHON=sys.executable,
               PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"], ALCF_HOSTNAME=POLARIS_HOST,
               DATA_FILE_LIST=data_list, TOKENIZER_TYPE="NullTokenizer", TOKENIZER_MODEL="none", **extra)
    return env


MEGATRON_FAULTS = "MEGATRON_TEST_FAULTS"


def launch(env: dict, *args: str) -> subprocess.CompletedProcess:
    # --peak-tflops: no test here reads the MFU, whose fp16 peak each rank would otherwise measure (~2 s on a CPU)
    return subprocess.run(["bash", os.path.join(ROOT, "train_alcf.sh"), *args, "--vocab-size", "500",
                           "--peak-tflops", "1"], env=env,
                          cwd=env["WORKING_DIR"], capture_output=True, text=True, timeout=900)


def test_polaris_dry_run_command_passes_check_args(data_list, tmp_path, monkeypatch):
    """DRY_RUN=1 on a Polaris PBS job (3 nodes x 4 GPUs): fp16 is the machine default, and the exact
    command (flags and DeepSpeed JSON) passes the trainer's --check-args."""
    hf = tmp_path / "nodefile"
    hf.write_text("".join(f"x3005c0s{i}b0n0\n" for i in range(3)))
    env = launcher_env(tmp_path, data_list, DRY_RUN="1", PBS_NODEFILE=str(hf), NGPU_PER_HOST="4", TRAIN_ITERS="10")
    p = launch(env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    cfg = json.loads("\n".join(lines[lines.index("{"):lines.index("}") + 1]))
    assert cfg["fp16"]["enabled"] is True and cfg["zero_optimization"]["stage"] == 1
    import shlex

    argv = shlex.split(" ".join(line.rstrip("\\") for line in lines[lines.index("# command:") + 1:]))
    flags = argv[next(i for i, t in enumerate(argv) if t.endswith("pretrain_gpt.py")) + 1:]
    assert "--fp16" in flags
    (tmp_path / "ds-configs").mkdir(exist_ok=True)
    ds_path = next(f.split("=", 1)[1] for f in flags if f.startswith("--deepspeed_config="))
    (tmp_path / ds_path).write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "12")
    from test_bad_inputs import _pretrain_main

    # --skip-memory-check: the memory preflight would measure this CPU host, not Polaris' A100s (a 7B model on
    # 12 ranks of a 24 GiB machine does not fit); tests/test_preflight_memory.py covers the check itself
    assert _pretrain_main()(flags + ["--check-args", "--skip-memory-check"]) == 0


@pytest.mark.slow
def test_polaris_default_trains_on_cpu_overflow_skipped_and_resumed_exactly(data_list, tmp_path):
    """NPROC=2 on a Polaris host: DTYPE=fp16, ZeRO-1, 8 micro-batches and the launcher's fp16 block
    (dynamic, hysteresis 2) from the machine defaults (only the backend is gloo: no NCCL on a CPU).
    Overflows forced at iterations 2 and 3: the first uses up the hysteresis (scale kept), the second
    halves the scale. Resumed from the checkpoint of iteration 2 (between the two), the run repeats
    iterations 3 and 4 exactly: losses, loss scale (so the hysteresis state was restored), weights."""
    env = launcher_env(tmp_path, data_list, NPROC="2", NCCL="gloo", MODEL_ARCH="tiny", TRAIN_ITERS="4",
                       SAVE_INTERVAL="2", EVAL_ITERS="1", **{MEGATRON_FAULTS: "overflow@2,overflow@3"})
    p = launch(env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    (ckpt,) = glob.glob(str(tmp_path / "checkpoints" / "tiny-ws2-ds-stage1-*fp16*"))
    full = records(os.path.join(ckpt, "metrics.jsonl"))
    assert [full[i]["loss_scale"] for i in (1, 2, 3, 4)] == [65536.0, 65536.0, 32768.0, 32768.0]
    assert [full[i]["skipped_iterations"] for i in (1, 2, 3, 4)] == [0, 1, 1, 0]
    assert math.isfinite(full[4]["lm_loss"]) and full[4]["lm_loss"] < 7
    final = torch_load(os.path.join(ckpt, "global_step4", "mp_rank_00_model_states.pt"))["module"]
    assert all(v.dtype == torch.float16 for v in final.values())
    shutil.rmtree(os.path.join(ckpt, "global_step4"))
    for name, text in (("latest", "global_step2"), ("latest_checkpointed_iteration.txt", "2")):
        with open(os.path.join(ckpt, name), "w") as f:
            f.write(text)
    p = launch({**env, "CHECK_ARGS": "0"})  # the first launch ran --check-args already
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    resumed = records(os.path.join(ckpt, "metrics.jsonl"))
    for i in (3, 4):
        for key in ("lm_loss", "loss_scale", "grad_norm", "lr", "skipped_iterations", "skipped_iterations_total"):
            assert resumed[i][key] == full[i][key] or (math.isinf(full[i][key]) and math.isinf(resumed[i][key])), \
                (i, key, resumed[i][key], full[i][key])
    again = torch_load(os.path.join(ckpt, "global_step4", "mp_rank_00_model_states.pt"))["module"]
    assert sorted(again) == sorted(final) and all(torch.equal(again[k], final[k]) for k in final)
