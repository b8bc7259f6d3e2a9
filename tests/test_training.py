"""End-to-end training under DeepSpeed on CPU: data parallelism gives the same losses as one rank,
every launcher works, and a resumed run reproduces the uninterrupted one."""
from __future__ import annotations

import os

import pytest

from distributed import TINY_MODEL, make_dataset, read_metrics, run_trainer

pytestmark = pytest.mark.slow
ITERS = 6


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("toy-data")))


def trainer_args(data_list: str, out: str, *, mb: int, gbs: int, zero: int, iters: int = ITERS,
                 extra: tuple = ()) -> list[str]:
    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", str(mb), "--global-batch-size", str(gbs), "--train-iters", str(iters),
        "--lr", "0.003", "--min-lr", "0.0003", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "2", "--num-workers", "0",
        "--zero-stage", str(zero), "--deepspeed", "--seed", "1234",
        "--metrics-file", os.path.join(out, "metrics.jsonl"), *extra,
    ]


@pytest.fixture(scope="module")
def reference(data_list, tmp_path_factory):
    """1 rank, micro 4 x 2 accumulation steps = global batch 8; saves at iteration ITERS/2 and the end."""
    out = str(tmp_path_factory.mktemp("ref"))
    run_trainer(trainer_args(data_list, out, mb=4, gbs=8, zero=1,
                             extra=("--save", os.path.join(out, "ckpt"), "--save-interval", str(ITERS // 2))))
    losses, _ = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert sorted(losses) == list(range(1, ITERS + 1))
    return out, losses


def assert_same_losses(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    diffs = {i: abs(got[i] - want[i]) for i in want}
    assert max(diffs.values()) <= tol, f"per-step loss differences {diffs}"


def test_reference_run_learns(reference):
    _, losses = reference
    assert losses[ITERS] < losses[1] - 0.1, losses


@pytest.mark.parametrize("zero,launcher", [(1, "torchrun"), (1, "mpiexec"), (2, "mpiexec"), (3, "torchrun")])
def test_two_ranks_match_one_rank(reference, data_list, tmp_path, zero, launcher):
    """2 ranks x micro 4 (no accumulation) see the same 8 samples per step as 1 rank x 4 x 2."""
    _, want = reference
    run_trainer(trainer_args(data_list, str(tmp_path), mb=4, gbs=8, zero=zero), nproc=2, launcher=launcher)
    got, _ = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert_same_losses(got, want)


def test_resume_reproduces_uninterrupted_run(reference, data_list, tmp_path):
    """Copy the checkpoint of iteration ITERS/2, resume to ITERS: the losses of steps ITERS/2+1..ITERS match."""
    ref_out, want = reference
    import shutil

    ckpt = os.path.join(tmp_path, "ckpt")
    shutil.copytree(os.path.join(ref_out, "ckpt"), ckpt)
    half = ITERS // 2
    with open(os.path.join(ckpt, "latest"), "w") as f:
        f.write(f"global_step{half}")
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(half))
    run_trainer(trainer_args(data_list, str(tmp_path), mb=4, gbs=8, zero=1,
                             extra=("--load", ckpt, "--save", ckpt, "--use-checkpoint-opt_param-scheduler")))
    got, _ = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert sorted(got) == list(range(half + 1, ITERS + 1))
    assert_same_losses(got, {i: want[i] for i in range(half + 1, ITERS + 1)}, tol=1e-6)
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == str(ITERS)
    assert os.path.isdir(os.path.join(ckpt, f"global_step{ITERS}"))
    assert os.path.isfile(os.path.join(ckpt, f"global_step{ITERS}", "mp_rank_00_model_states.pt"))


def test_bad_input_refused_before_deepspeed(data_list, tmp_path):
    """Configuration errors: one ERROR line each, exit 2, nothing written, DeepSpeed never imported."""
    base = trainer_args(data_list, str(tmp_path), mb=4, gbs=8, zero=1)
    cases = [
        (["--data-file-list", str(tmp_path / "missing.txt")], "missing.txt: file not found"),
        (["--num-key-value-heads", "3"], "divisible by --num-key-value-heads"),
        (["--tensor-model-parallel-size", "3"], "not divisible by TP*PP*SP"),
        (["--global-batch-size", "6"], "multiple of micro-batch-size"),
        (["--zero-stage", "4"], "--zero-stage must be 0, 1, 2 or 3"),
    ]
    for extra, message in cases:
        proc = run_trainer(base + extra, check=False, env_extra={"WORLD_SIZE": "2"}
                           if "TP*PP*SP" in message else None)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR:")]
        assert errors and any(message in ln for ln in errors), (extra, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        assert "deepspeed" not in proc.stdout.lower()
    assert not os.path.exists(tmp_path / "metrics.jsonl")
