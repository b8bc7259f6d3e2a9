"""megatron/checkpoint/io.py: restricted unpickling of checkpoint files, and a full disk during a save.

* A `.pt` whose pickle calls `os.system` (it would create a marker file) is refused by every
  loader of ours that reads checkpoints, and the marker is never created; the same file loaded
  with weights_only=False does create it (so the test file really is malicious).
* Disk full during a save, two ways: ENOSPC injected at the file-write layer
  (MEGATRON_TEST_FAULTS=enospc@k, always runs; also on one rank of two) and a real, tiny tmpfs
  (needs root to mount; skipped otherwise). The save fails with one line naming the directory and
  the cause, exit status 4, `latest` still names the previous complete checkpoint, which loads,
  and no partial directory is left. A full disk under `--metrics-file` alone: one line, exit 4.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from distributed import ROOT, TINY_MODEL, make_dataset, run_trainer

from megatron.checkpoint import io as checkpoint_io
from megatron.checkpoint import checkpointing as ck


class _Evil:
    """Unpickling it runs `touch <marker>`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: str, marker: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"module": {"w": torch.zeros(2)}, "args": _Evil(marker)}, path)


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("toy-data")))


def trainer_args(data_list: str, out: str, save: str, iters: int = 6, extra: tuple = ()) -> list[str]:
    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(iters), "--lr", "0.003",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", "--zero-stage", "1", "--deepspeed",
        "--keep-zero-stage",  # ZeRO-1 proper at 1 rank too: model file + ZeRO shard (sizes below assume it)
        "--save", save, "--save-interval", "2", "--metrics-file", os.path.join(out, "metrics.jsonl"),
        "--tensorboard-dir", os.path.join(out, "tb"), *extra,
    ]


# ----------------------------------------------------------------------------- malicious pickles
def test_malicious_pickle_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "ckpt" / "global_step1" / "mp_rank_00_model_states.pt")
    _evil_checkpoint(path, marker)
    with pytest.raises(checkpoint_io.CheckpointLoadRefused, match=r"mp_rank_00_model_states.pt: it holds a Python "
                       r"object outside the checkpoint allowlist \((posix|os)\.system\)"):
        checkpoint_io.torch_load(path)
    with pytest.raises(checkpoint_io.CheckpointLoadRefused, match=r"\((posix|os)\.system\)"):
        checkpoint_io.check_pickle_globals(path)  # the pickle-only check used before DeepSpeed's readers
    engine = checkpoint_io.GuardedCheckpointEngine(_torch_engine())
    with pytest.raises(checkpoint_io.CheckpointLoadRefused):
        engine.load(path, map_location="cpu")  # what DeepSpeed's load_checkpoint calls
    assert not os.path.exists(marker)
    # the premise: an unrestricted load of the same file runs its code
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({path!r}, weights_only=False)"], check=True,
                   cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})
    assert os.path.exists(marker)


class _ByName:
    """Pickles as `getattr(cls, name)`: how Python 3.11.2 and 3.12+ pickle an Enum member (3.11.7 pickles
    `cls(value)`), e.g. DeepSpeed's ZeroStageEnum in every ZeRO optimizer shard."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return (getattr, (self.cls, self.name))


def test_enum_member_pickled_by_name_loads_and_other_getattrs_are_refused(tmp_path):
    import argparse

    from deepspeed.runtime.zero.config import ZeroStageEnum

    ok = str(tmp_path / "enum.pt")
    torch.save({"zero_stage": _ByName(ZeroStageEnum, "optimizer_states"), "w": torch.ones(2)}, ok)
    checkpoint_io.check_pickle_globals(ok)
    assert checkpoint_io.torch_load(ok)["zero_stage"] is ZeroStageEnum.optimizer_states
    for i, (cls, name) in enumerate([(argparse.Namespace, "__init__"), (ZeroStageEnum, "__class__"),
                                     (ZeroStageEnum, "mro")]):
        bad = str(tmp_path / f"bad{i}.pt")  # an attribute of an allowed class that is not an Enum member
        torch.save({"x": _ByName(cls, name)}, bad)
        with pytest.raises(checkpoint_io.CheckpointLoadRefused):
            checkpoint_io.torch_load(bad)


def _torch_engine():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return TorchCheckpointEngine()


def test_hf_export_refuses_malicious_pickle(tmp_path):
    marker = str(tmp_path / "pwned")
    ckpt = tmp_path / "ckpt"
    _evil_checkpoint(str(ckpt / "global_step1" / "mp_rank_00_model_states.pt"), marker)
    (ckpt / "latest").write_text("global_step1")
    from tools.convert_checkpoint.to_hf import load_fp32_weights, saved_args

    with pytest.raises(checkpoint_io.CheckpointLoadRefused):
        saved_args(str(ckpt / "global_step1"))
    with pytest.raises(checkpoint_io.CheckpointLoadRefused):
        load_fp32_weights(str(ckpt), "global_step1")
    assert not os.path.exists(marker)


@pytest.mark.slow
def test_trainer_refuses_malicious_checkpoint(data_list, tmp_path):
    """--load of a checkpoint whose model-states file is a malicious pickle: one ERROR line, exit 2,
    the marker is not created."""
    marker = str(tmp_path / "pwned")
    ckpt = tmp_path / "ckpt"
    _evil_checkpoint(str(ckpt / "global_step1" / "mp_rank_00_model_states.pt"), marker)
    (ckpt / "latest").write_text("global_step1")
    out = str(tmp_path / "run")
    proc = run_trainer(trainer_args(data_list, out, str(tmp_path / "save"), extra=("--load", str(ckpt))),
                       check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "global_step1/mp_rank_00_model_states.pt: it holds a Python object outside the " \
        "checkpoint allowlist" in errors[0] and "--unsafe-checkpoint-load" in errors[0], errors
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(marker)


# ----------------------------------------------------------------------------- disk full
def _assert_previous_checkpoint_intact(save: str, tag: str, failed_tag: str) -> None:
    assert ck.read_tag(save) == tag
    with open(os.path.join(save, ck.TRACKER_FILE)) as f:
        assert f.read().strip() == tag[len("global_step"):]
    assert not os.path.exists(os.path.join(save, failed_tag))
    assert not glob.glob(os.path.join(save, "*" + ck.PARTIAL_SUFFIX))
    files = sorted(os.listdir(os.path.join(save, tag)))
    assert "mp_rank_00_model_states.pt" in files and any(f.endswith("optim_states.pt") for f in files), files
    for f in files:
        if f.endswith(".pt"):
            checkpoint_io.torch_load(os.path.join(save, tag, f), map_location="cpu")  # complete and loadable
    with open(os.path.join(save, tag, ck.ARGS_FILE)) as f:
        assert json.load(f)["iteration"] == int(tag[len("global_step"):])


def _the_error(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_injected_enospc_stops_run_and_keeps_latest(data_list, tmp_path):
    """Saves at 2 and 4; the save of 4 hits ENOSPC: exit 4, one line, `latest` = global_step2 (loads),
    no global_step4(.partial); the run resumes from global_step2."""
    out, save = str(tmp_path / "run"), str(tmp_path / "ckpt")
    proc = run_trainer(trainer_args(data_list, out, save), check=False, env_extra={"MEGATRON_TEST_FAULTS": "enospc@4"})
    assert proc.returncode == 4, proc.stderr[-3000:]
    line = _the_error(proc.stderr)
    assert line == (f"ERROR: saving checkpoint global_step4 to {save} failed (disk full): {save}/global_step4.partial/"
                    "mp_rank_00_model_states.pt: [Errno 28] No space left on device (injected by "
                    "MEGATRON_TEST_FAULTS); 'latest' still names global_step2 and the incomplete global_step4.partial was removed; free space "
                    "(or point --save elsewhere) and resume with --load"), line
    assert "Traceback" not in proc.stderr
    _assert_previous_checkpoint_intact(save, "global_step2", "global_step4")
    # and the run picks up from there once there is room again
    run_trainer(trainer_args(data_list, out, save, extra=("--load", save, "--exit-interval", "4")))
    assert ck.read_tag(save) == "global_step4"
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(ln)["iteration"] for ln in f if "lm_loss" in ln][-2:] == [3, 4]


@pytest.mark.slow
def test_enospc_on_one_rank_of_two(data_list, tmp_path):
    """Only rank 1's ZeRO shard write fails: both ranks stop together (no hang), rank 0 reports rank 1's
    error, `latest` stays at global_step2."""
    out, save = str(tmp_path / "run"), str(tmp_path / "ckpt")
    proc = run_trainer(trainer_args(data_list, out, save), nproc=2, launcher="torchrun", check=False, timeout=300,
                       env_extra={"MEGATRON_TEST_FAULTS": "enospc@4:1"})
    assert proc.returncode != 0
    line = _the_error(proc.stderr)
    assert line.startswith(f"ERROR: saving checkpoint global_step4 to {save} failed (disk full): rank 1: "
                           f"{save}/global_step4.partial/zero_pp_rank_1_mp_rank_00_optim_states.pt: [Errno 28] "), line
    assert "exitcode  : 4" in proc.stderr or "exitcode: 4" in proc.stderr.replace(" ", ""), proc.stderr[-2000:]
    _assert_previous_checkpoint_intact(save, "global_step2", "global_step4")


def _can_mount_tmpfs(path: str, size: str = "3500k") -> bool:
    if os.geteuid() != 0:
        return False
    os.makedirs(path, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path]
    return subprocess.run(mount, capture_output=True, check=False).returncode == 0


@pytest.mark.slow
def test_real_full_disk_tmpfs(data_list, tmp_path):
    """--save on a 3.5 MB tmpfs: global_step2 (2.3 MB) fits, global_step4 does not. Same outcome as
    the injected fault, with the error the file system really gives."""
    small = str(tmp_path / "small")
    if not _can_mount_tmpfs(small):
        pytest.skip("mounting a tmpfs needs root (the injected-ENOSPC tests cover the same path)")
    try:
        out, save = str(tmp_path / "run"), os.path.join(small, "ckpt")
        proc = run_trainer(trainer_args(data_list, out, save), check=False)
        assert proc.returncode == 4, proc.stderr[-3000:]
        line = _the_error(proc.stderr)
        assert line.startswith(f"ERROR: saving checkpoint global_step4 to {save} failed (disk full): {save}/"
                               "global_step4.partial/"), line
        assert "[Errno 28] No space left on device; 'latest' still names global_step2 and the incomplete " \
            "global_step4.partial was removed" in line, line
        assert "Traceback" not in proc.stderr
        _assert_previous_checkpoint_intact(save, "global_step2", "global_step4")
    finally:
        subprocess.run(["umount", small], check=False)


@pytest.mark.slow
def test_metrics_disk_full_tmpfs(data_list, tmp_path):
    """--metrics-file on an 8 KB tmpfs (fills after ~15 lines), checkpoints elsewhere: one line, exit 4,
    the last checkpoint intact."""
    small = str(tmp_path / "small")
    if not _can_mount_tmpfs(small, "8k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        out, save = str(tmp_path / "run"), str(tmp_path / "ckpt")
        args = trainer_args(data_list, out, save, iters=40) + ["--metrics-file", os.path.join(small, "metrics.jsonl")]
        proc = run_trainer(args, check=False)
        assert proc.returncode == 4, proc.stderr[-3000:]
        line = _the_error(proc.stderr)
        assert line == (f"ERROR: a write failed (disk full): [Errno 28] No space left on device; check the space where "
                        f"--save ({save}) and --metrics-file ({small}/metrics.jsonl) write; the last checkpoint is "
                        "intact: free space and resume with --load"), line
        tag = ck.read_tag(save)
        assert tag is not None and 2 <= int(tag[len("global_step"):]) < 40
        _assert_previous_checkpoint_intact(save, tag, "global_step40")
    finally:
        subprocess.run(["umount", small], check=False)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "--rootdir", ROOT]))


def test_second_read_of_the_same_file_is_reused_once(tmp_path, monkeypatch):
    """DeepSpeed reads the first model file twice per load (mp_world_size check, then the load):
    the wrapper hands the first read out once more, only for the same unchanged file and the
    identity map_location, and never after `end_load`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    reads = []
    real = checkpoint_io.torch_load
    monkeypatch.setattr(checkpoint_io, "torch_load", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    engine = checkpoint_io.GuardedCheckpointEngine(TorchCheckpointEngine())
    path = str(tmp_path / "m.pt")
    torch.save({"module": {"w": torch.arange(4.0)}, "mp_world_size": 1}, path)
    ident = lambda storage, loc: storage  # noqa: E731  (what DeepSpeed passes)
    first = engine.load(path, map_location=ident)
    assert engine.load(path, map_location=ident) is first and len(reads) == 1  # the second read: reused
    assert engine.load(path, map_location=ident) is not first and len(reads) == 2  # only once
    torch.save({"module": {"w": torch.zeros(4)}, "mp_world_size": 1}, path)  # the file changed: read again
    assert torch.equal(engine.load(path, map_location=ident)["module"]["w"], torch.zeros(4)) and len(reads) == 3
    engine.end_load()
    engine.load(path, map_location=ident)
    assert len(reads) == 4  # nothing kept across loads
    engine.load(path, map_location="cpu")
    engine.load(path, map_location="cpu")
    assert len(reads) == 6  # another map_location: never reused


@pytest.mark.slow
def test_trainer_refuses_malicious_universal_atom(data_list, tmp_path):
    """DeepSpeed reads universal atoms with weights_only=False: one malicious atom among the real
    ones is refused before any is unpickled (exit 2, one ERROR line naming it, no marker)."""
    from tools.convert_checkpoint import ds_to_universal as d2u

    save = str(tmp_path / "ckpt")
    run_trainer(trainer_args(data_list, str(tmp_path / "ref"), save, iters=2))
    d2u.convert(os.path.join(save, "global_step2"), os.path.join(save, "global_step2_universal"))
    atom = os.path.join(save, "global_step2_universal", "zero", "language_model.output_layer.weight", "exp_avg.pt")
    assert os.path.isfile(atom)
    marker = str(tmp_path / "pwned")
    _evil_checkpoint(atom, marker)
    proc = run_trainer(trainer_args(data_list, str(tmp_path / "run"), str(tmp_path / "save2"),
                                    extra=("--load", save, "--universal-checkpoint")), check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "output_layer.weight/exp_avg.pt: it holds a Python object outside the " \
        "checkpoint allowlist" in errors[0], errors
    assert "Traceback" not in proc.stderr and not os.path.exists(marker)
