"""Checkpoints through the real trainer on CPU: exact resume at ZeRO 1/2/3 x fp32/bf16 x 1/2 ranks,
atomic saves (SIGKILL while saving never leaves an unloadable `latest`), SIGTERM -> checkpoint and
exit 0, --keep-last-n, the --no-load-* flags, and one clear error per bad --load."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch
from distributed import TINY_MODEL, env_for, launch_command, make_dataset, run_trainer

from megatron.checkpoint import io as checkpoint_io
from megatron.checkpoint import checkpointing as ck
from megatron.config import Config, default_args

N = 3  # stop at N, resume to 2N


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("toy-data")))


def trainer_args(data_list: str, out: str, *, iters: int = 2 * N, zero: int = 1, bf16: bool = False,
                 mb: int = 4, gbs: int = 8, extra: tuple = ()) -> list[str]:
    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", str(mb), "--global-batch-size", str(gbs), "--train-iters", str(iters),
        "--lr", "0.003", "--min-lr", "0.0003", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0", "--num-workers", "0",
        "--zero-stage", str(zero), "--deepspeed", "--seed", "1234",
        "--metrics-file", os.path.join(out, "metrics.jsonl"), *(["--bf16"] if bf16 else []), *extra,
    ]


def metrics(out: str) -> dict[int, dict]:
    """iteration -> the whole metrics record (loss and LR)."""
    recs = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "lm_loss" in r:
                recs[r["iteration"]] = r
    return recs


def assert_same_run(got: dict, want: dict, iters, tol: float = 1e-6) -> None:
    assert sorted(got) == list(iters), sorted(got)
    for i in iters:
        assert abs(got[i]["lm_loss"] - want[i]["lm_loss"]) <= tol, (i, got[i]["lm_loss"], want[i]["lm_loss"])
        assert got[i]["lr"] == pytest.approx(want[i]["lr"], rel=1e-12, abs=0), (i, got[i]["lr"], want[i]["lr"])
        assert got[i]["consumed_samples"] == want[i]["consumed_samples"]


# ----------------------------------------------------------------------------- exact resume matrix
# Every stage, every dtype and both world sizes appear at least once (ZeRO-1/fp32/1 rank is in
# tests/test_training.py); 2 ranks x micro 4 and 1 rank x micro 4 x 2 accumulation both see 8 samples.
# ZeRO-1/bf16/1 rank: DeepSpeed's BF16_Optimizer with megatron/deepspeed_compat's single-replica changes.
MATRIX = [(1, False, 2), (1, True, 1), (2, True, 1), (3, True, 2), (3, False, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("zero,bf16,nproc", MATRIX, ids=[f"zero{z}-{'bf16' if b else 'fp32'}-{n}rank"
                                                          for z, b, n in MATRIX])
def test_exact_resume(data_list, tmp_path, zero, bf16, nproc):
    """Run 2N iterations saving at N; resume a copy of the N checkpoint to 2N: same losses, LR, data."""
    ref, res = str(tmp_path / "ref"), str(tmp_path / "res")
    save = os.path.join(ref, "ckpt")
    keep = ("--keep-zero-stage",) if nproc == 1 else ()  # one replica would run ZeRO-1/2 as stage 0
    run_trainer(trainer_args(data_list, ref, zero=zero, bf16=bf16,
                             extra=(*keep, "--save", save, "--save-interval", str(N))), nproc=nproc,
                launcher="ranks")
    want = metrics(ref)
    assert sorted(want) == list(range(1, 2 * N + 1))
    # resume from the N checkpoint: a copy where `latest` still names it
    ckpt = os.path.join(res, "ckpt")
    os.makedirs(ckpt)
    shutil.copytree(os.path.join(save, f"global_step{N}"), os.path.join(ckpt, f"global_step{N}"))
    ck.write_atomic(os.path.join(ckpt, "latest"), f"global_step{N}")
    run_trainer(trainer_args(data_list, res, zero=zero, bf16=bf16, extra=(*keep, "--load", ckpt, "--save", ckpt)),
                nproc=nproc, launcher="ranks")
    got = metrics(res)
    assert_same_run(got, want, range(N + 1, 2 * N + 1))
    assert ck.read_tag(ckpt) == f"global_step{2 * N}"
    with open(os.path.join(ckpt, ck.TRACKER_FILE)) as f:
        assert f.read().strip() == str(2 * N)
    saved = ck.read_saved_args(os.path.join(ckpt, f"global_step{2 * N}"))
    assert saved["zero_stage"] == zero and saved["world_size"] == nproc and saved["iteration"] == 2 * N
    assert not [p for p in os.listdir(ckpt) if p.endswith(ck.PARTIAL_SUFFIX)]


# ----------------------------------------------------------------------------- one data-parallel replica
@pytest.mark.slow
def test_single_replica_zero_runs_as_stage0(data_list, tmp_path):
    """ZeRO-1 with one data-parallel replica runs as stage 0: the same losses as ZeRO-1 proper
    (--keep-zero-stage) within 1e-6, no ZeRO shards on disk, stage 0 recorded. A stage 1
    checkpoint is resumed at stage 1 without the flag (exactly); a stage 0 checkpoint loaded by
    2 ranks at ZeRO-1 is refused before DeepSpeed starts, with the conversion command."""
    auto, keep = str(tmp_path / "auto"), str(tmp_path / "keep")
    run_trainer(trainer_args(data_list, auto, extra=("--save", os.path.join(auto, "ckpt"), "--save-interval", str(N))))
    run_trainer(trainer_args(data_list, keep, extra=("--keep-zero-stage", "--save", os.path.join(keep, "ckpt"),
                                                     "--save-interval", str(N))))
    want, got = metrics(keep), metrics(auto)
    assert_same_run(got, want, range(1, 2 * N + 1))
    for i in range(1, 2 * N + 1):  # stage 0 logs the clipped gradient's norm too (it used to log nan in fp32)
        assert got[i]["grad_norm"] == pytest.approx(want[i]["grad_norm"], rel=1e-5), (i, got[i], want[i])
    auto_step, keep_step = (os.path.join(d, "ckpt", f"global_step{N}") for d in (auto, keep))
    assert not [f for f in os.listdir(auto_step) if f.endswith("optim_states.pt")]
    assert [f for f in os.listdir(keep_step) if f.endswith("optim_states.pt")]
    assert ck.read_saved_args(auto_step)["zero_stage"] == 0 and ck.read_saved_args(keep_step)["zero_stage"] == 1
    # a stage 1 checkpoint keeps its stage when resumed with one replica
    res = str(tmp_path / "res")
    ckpt = _copy_tag(os.path.join(keep, "ckpt"), os.path.join(res, "ckpt"), f"global_step{N}")
    run_trainer(trainer_args(data_list, res, extra=("--load", ckpt, "--save", ckpt)))
    assert_same_run(metrics(res), want, range(N + 1, 2 * N + 1))
    assert ck.read_saved_args(os.path.join(ckpt, f"global_step{2 * N}"))["zero_stage"] == 1
    # a stage 0 checkpoint cannot feed ZeRO-1 proper (2 replicas) without conversion
    proc = run_trainer(trainer_args(data_list, str(tmp_path / "two"), extra=("--load", os.path.join(auto, "ckpt"))),
                       nproc=2, launcher="torchrun", check=False)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "was saved at ZeRO stage 0" in line]
    assert proc.returncode != 0 and errors, (proc.stdout + proc.stderr)[-3000:]
    assert "--universal-checkpoint" in errors[0] and "ds_to_universal.py" in errors[0]
    assert "[rank" not in proc.stderr  # refused by the argument check, not by a crash inside DeepSpeed


# ----------------------------------------------------------------------------- the --no-load-* flags
@pytest.fixture(scope="module")
def ref_run(data_list, tmp_path_factory):
    """1 rank, ZeRO-1 fp32, 2N iterations, checkpoint at N and 2N (keep-last-n 1 -> only the last)."""
    out = str(tmp_path_factory.mktemp("ref1"))
    save = os.path.join(out, "ckpt")
    run_trainer(trainer_args(data_list, out, extra=("--save", save, "--save-interval", "1", "--keep-last-n", "2",
                                                    "--log-optimizer-states-to-tensorboard")))
    return out, save, metrics(out)


def test_keep_last_n_keeps_newest_and_latest(ref_run):
    _, save, want = ref_run
    assert [n for _, n in ck.checkpoint_tags(save)] == [f"global_step{2 * N - 1}", f"global_step{2 * N}"]
    assert ck.read_tag(save) == f"global_step{2 * N}"
    assert sorted(want) == list(range(1, 2 * N + 1))


def _copy_tag(save: str, dst: str, tag: str) -> str:
    os.makedirs(dst, exist_ok=True)
    shutil.copytree(os.path.join(save, tag), os.path.join(dst, tag))
    ck.write_atomic(os.path.join(dst, "latest"), tag)
    return dst


@pytest.mark.slow
def test_no_load_flags_and_finetune(ref_run, data_list, tmp_path):
    """--no-load-optim / --no-load-lr-state / --finetune each change exactly what they promise."""
    _, save, want = ref_run
    tag = f"global_step{2 * N - 1}"
    ckpt = _copy_tag(save, str(tmp_path / "ckpt"), tag)
    cases = {
        "full": (),
        "no-optim": ("--no-load-optim",),
        "no-lr": ("--no-load-lr-state", "--no-load-rng"),
        "finetune": ("--finetune",),
    }
    got = {}
    for name, flags in cases.items():
        out = str(tmp_path / name)
        run_trainer(trainer_args(data_list, out, iters=2 * N,
                                 extra=("--load", ckpt, "--log-optimizer-states-to-tensorboard", *flags)))
        got[name] = metrics(out)
    # full resume: the step after `start` equals the uninterrupted run
    assert_same_run(got["full"], want, [2 * N])
    # the loss of the first step depends on weights only: same for every variant that resumes there
    assert got["no-optim"][2 * N]["lm_loss"] == pytest.approx(want[2 * N]["lm_loss"], abs=1e-6)
    assert got["no-lr"][2 * N]["lm_loss"] == pytest.approx(want[2 * N]["lm_loss"], abs=1e-6)
    # ... but the optimizer step differs: the Adam moments after step 2N (logged statistics of the real state)
    # continue the saved ones in the full resume and start from zero with --no-load-optim
    # (after one step from zero: |m| = (1 - beta1) |g| and v = (1 - beta2) g^2, far below the resumed ones)
    for stat in ("momentum_l2", "variance_l2"):
        full, fresh = (got[k][2 * N]["optimizer"][stat] for k in ("full", "no-optim"))
        ref = want[2 * N]["optimizer"][stat]
        assert full == pytest.approx(ref, rel=1e-5), stat
        assert fresh < 0.7 * ref, (stat, fresh, ref)
    assert got["no-optim"][2 * N]["optimizer"]["weight_l2"] != pytest.approx(want[2 * N]["optimizer"]["weight_l2"],
                                                                           rel=1e-7)
    assert got["no-optim"][2 * N]["lr"] == pytest.approx(want[2 * N]["lr"], rel=1e-12)
    # --no-load-lr-state: the scheduler restarts from 0 samples (warmup of 2 iterations: LR/2 after 1 step)
    assert got["no-lr"][2 * N]["lr"] == pytest.approx(0.003 * 1 / 2, rel=1e-9)
    # --finetune: iteration 1 again, data from sample 0, LR schedule from 0
    ft = got["finetune"]
    assert sorted(ft) == list(range(1, 2 * N + 1))
    assert ft[1]["consumed_samples"] == 8 and ft[1]["lr"] == pytest.approx(0.003 / 2, rel=1e-9)
    assert ft[1]["lm_loss"] < want[1]["lm_loss"] - 0.05  # trained weights were loaded


# ----------------------------------------------------------------------------- bad --load
@pytest.mark.slow
def test_bad_load_messages(ref_run, data_list, tmp_path):
    """Each bad --load: exit 2, one ERROR line naming the fix, before DeepSpeed starts."""
    _, save, _ = ref_run
    empty = tmp_path / "empty"
    empty.mkdir()
    no_latest = tmp_path / "no-latest"
    shutil.copytree(os.path.join(save, f"global_step{2 * N}"), no_latest / f"global_step{2 * N}")
    other_arch_extra = ["--num-layers", "3", "--hidden-size", "32"]
    base = trainer_args(data_list, str(tmp_path / "out"))
    cases = [
        (["--load", str(tmp_path / "nothing"), "--finetune"], "no such directory"),
        (["--load", str(tmp_path / "nothing"), "--exit-on-missing-checkpoint"], "no such directory"),
        (["--load", str(empty), "--exit-on-missing-checkpoint"], "no checkpoint found"),
        (["--load", str(no_latest)], f"--load-tag global_step{2 * N}"),
        (["--load", save, "--load-tag", "global_step99"], "global_step99"),
        (["--load", save, *other_arch_extra], "num_layers: checkpoint 2 vs now 3"),
        (["--load", save, "--universal-checkpoint", "--finetune"],
         f"--input_folder {save}/global_step{2 * N} --output_folder {save}/global_step{2 * N}_universal"),
        (["--load", save, "--keep-last-n", "0"], "--keep-last-n must be >= 1"),
    ]
    for extra, message in cases:
        proc = run_trainer(base + extra, check=False)
        assert proc.returncode == 2, (extra, proc.stderr[-3000:])
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR:")]
        assert errors and any(message in ln for ln in errors), (extra, errors, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "deepspeed" not in proc.stdout.lower()
    # a plain resume from an empty directory is a fresh start (the launcher's LOAD=CKPT_DIR default)
    assert ck.load_problems(Config.from_args(default_args(load=str(empty), finetune=False, universal_checkpoint=False,
                                                          load_tag=None, exit_on_missing_checkpoint=False))) == []


# ----------------------------------------------------------------------------- atomic commit / prune (unit)
def test_commit_and_prune_unit(tmp_path):
    save = str(tmp_path)
    for it in (1, 2, 3):
        part = os.path.join(save, f"global_step{it}{ck.PARTIAL_SUFFIX}")
        os.makedirs(part)
        open(os.path.join(part, "x.pt"), "w").close()
        ck.commit(save, os.path.basename(part), f"global_step{it}", it)
    # a crashed save leaves only a partial dir: latest untouched, and the next prune removes it
    os.makedirs(os.path.join(save, f"global_step4{ck.PARTIAL_SUFFIX}"))
    assert ck.read_tag(save) == "global_step3"
    # latest points at an older one (e.g. --load-tag rollback): pruning must keep it
    ck.write_atomic(os.path.join(save, "latest"), "global_step1")
    deleted = ck.prune(save, keep_last_n=1)
    assert sorted(deleted) == ["global_step2", f"global_step4{ck.PARTIAL_SUFFIX}"]
    assert [n for _, n in ck.checkpoint_tags(save)] == ["global_step1", "global_step3"]
    # re-saving an existing iteration replaces it atomically
    os.makedirs(os.path.join(save, "global_step3.partial"))
    open(os.path.join(save, "global_step3.partial", "new.pt"), "w").close()
    ck.commit(save, "global_step3.partial", "global_step3", 3)
    assert os.listdir(os.path.join(save, "global_step3")) == ["new.pt"]
    assert not [p for p in os.listdir(save) if ".old." in p or ".tmp." in p]
    with open(os.path.join(save, ck.TRACKER_FILE)) as f:
        assert f.read() == "3"


def test_cooldown_warning_unit():
    """Constant LR with a cooldown over the last 20 of 100 samples: warn only inside the cooldown."""
    from megatron.schedules import OptimizerParamScheduler, ScheduleSpec

    spec = ScheduleSpec(max_lr=1e-3, min_lr=0.0, warmup_steps=0, decay_steps=100, end_steps=100,
                        decay_style="constant", constant_plus_cooldown_steps=20)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = OptimizerParamScheduler(opt, spec, 0.0, 0.0, 100)
    sched.step(80)
    assert ck.cooldown_warning(sched.state_dict()) is None  # at LR_max, cooldown not started
    sched.step(5)
    msg = ck.cooldown_warning(sched.state_dict())
    assert msg and "already in its cooldown" in msg and "LR_max" in msg
    nocool = OptimizerParamScheduler(opt, ScheduleSpec(1e-3, 0.0, 0, 100, 100, "cosine"), 0.0, 0.0, 100)
    nocool.step(90)
    assert ck.cooldown_warning(nocool.state_dict()) is None  # not a constant schedule: not phase 1


# ----------------------------------------------------------------------------- signals
def _wait_for_iteration(path: str, it: int, proc, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path):
            with open(path) as f:
                if any(json.loads(ln).get("iteration", 0) >= it for ln in f if ln.strip()):
                    return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(data_list, tmp_path):
    """--exit-signal-handler: SIGTERM -> checkpoint of the current iteration, exit 0; resuming it
    reproduces the uninterrupted run."""
    out = str(tmp_path / "a")
    ckpt = os.path.join(out, "ckpt")
    args = trainer_args(data_list, out, iters=200, extra=("--save", ckpt, "--exit-signal-handler"))
    proc = subprocess.Popen(launch_command(1, "python") + args, env=env_for(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_iteration(os.path.join(out, "metrics.jsonl"), 1, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "(signal)" in stdout
    stopped = max(metrics(out))
    assert 1 <= stopped < 200 and ck.read_tag(ckpt) == f"global_step{stopped}"
    with open(os.path.join(ckpt, ck.TRACKER_FILE)) as f:
        assert f.read().strip() == str(stopped)
    # the checkpoint resumes: one more iteration, at the right data position
    run_trainer(trainer_args(data_list, out, iters=200, extra=("--load", ckpt, "--save", ckpt,
                                                               "--exit-interval", str(stopped + 1))))
    got = metrics(out)
    assert max(got) == stopped + 1 and got[stopped + 1]["consumed_samples"] == (stopped + 1) * 8
    assert ck.read_tag(ckpt) == f"global_step{stopped + 1}"


@pytest.mark.slow
def test_sigkill_during_saves_never_breaks_latest(data_list, tmp_path):
    """Save every iteration; SIGKILL at random moments. `latest` always names a complete
    checkpoint (every file loads, iteration matches), and training resumes from it."""
    out = str(tmp_path / "k")
    ckpt = os.path.join(out, "ckpt")
    rng = random.Random(0)
    last = 0
    for _attempt in range(3):
        if os.path.exists(os.path.join(out, "metrics.jsonl")):
            os.remove(os.path.join(out, "metrics.jsonl"))
        # a run far longer than the test waits: it is always killed mid-run, never finishes first
        args = trainer_args(data_list, out, iters=5000, extra=("--save", ckpt, "--save-interval", "1", "--load", ckpt,
                                                              "--keep-last-n", "2", "--keep-zero-stage"))
        proc = subprocess.Popen(launch_command(1, "python") + args, env=env_for(1), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        _wait_for_iteration(os.path.join(out, "metrics.jsonl"), 1, proc)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.communicate()
        tag = ck.read_tag(ckpt)
        if tag is None:
            continue
        tag_dir = os.path.join(ckpt, tag)
        files = sorted(os.listdir(tag_dir))
        assert "mp_rank_00_model_states.pt" in files and ck.ARGS_FILE in files, files
        assert any(f.endswith("optim_states.pt") for f in files), files
        for f in files:
            if f.endswith(".pt"):
                checkpoint_io.torch_load(os.path.join(tag_dir, f), map_location="cpu")  # as --load reads it
        it = int(tag[len("global_step"):])
        assert ck.read_saved_args(tag_dir)["iteration"] == it
        assert it >= last
        last = it
    assert last >= 1
    # and the trainer resumes from whatever `latest` names
    run_trainer(trainer_args(data_list, out, iters=last + 1, extra=("--load", ckpt, "--save", ckpt,
                                                                        "--override-opt_param-scheduler")))
    assert ck.read_tag(ckpt) == f"global_step{last + 1}"


@pytest.mark.parametrize("name", ["cuda", "xpu"])
def test_the_accelerators_generator_is_saved_and_restored(monkeypatch, name):
    """The default generator of the accelerator (CUDA on Polaris, XPU on Aurora: the one the dropout masks
    come from) goes into the checkpoint's RNG state and back, so a resumed run draws what an uninterrupted
    one would (the XPU's was not saved). Faked here: this torch has neither device."""
    from types import SimpleNamespace

    restored = []
    fake = SimpleNamespace(is_available=lambda: True, get_rng_state=lambda: torch.tensor([7, 8], dtype=torch.uint8),
                           set_rng_state=restored.append)
    other = "xpu" if name == "cuda" else "cuda"
    monkeypatch.setattr(torch, name, fake, raising=False)
    monkeypatch.setattr(torch, other, SimpleNamespace(is_available=lambda: False), raising=False)
    state = ck._rng_state()
    assert state[name].tolist() == [7, 8] and other not in state
    ck._set_rng_state(state)
    assert len(restored) == 1 and restored[0].tolist() == [7, 8]
    ck._set_rng_state({k: v for k, v in state.items() if k != name})  # a checkpoint from another device
    assert len(restored) == 1
