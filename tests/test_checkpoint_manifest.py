"""megatron/checkpoint/manifest.py and its use by checkpointing.py / tools/verify_checkpoint.py.

* The manifest of a real save lists exactly the files of the checkpoint, with their sizes and the
  checksums recomputed here with xxhash directly (the save hashes while writing, without reading back).
* One byte flipped (checksums only), a truncated file, a foreign file dropped in, a missing file:
  each detected and named, with the newest intact tag to load instead; a truncated file refuses a
  trainer start in one ERROR line, exit 2, before DeepSpeed starts.
* --verify-checkpoint --fallback-to-intact-checkpoint with a bit-flipped newest checkpoint: the
  trainer loads the previous one (warning) and its losses from there equal the uninterrupted run's.
* A checkpoint without a manifest (written before manifests) still loads.
* A 2-rank save writes one complete manifest (rank 1's ZeRO shard, hashed by rank 1); a 2-rank
  --verify-checkpoint finds one flipped byte in rank 1's shard and both ranks stop.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from types import SimpleNamespace

import pytest
import xxhash
from distributed import ROOT, TINY_MODEL, make_dataset, run_trainer

from megatron.checkpoint import manifest as cm
from megatron.checkpoint import checkpointing as ck
from megatron.arguments import ArgumentError, build_parser
from megatron.config import Config, default_args

MODEL = "mp_rank_00_model_states.pt"
SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def data_list(tmp_path_factory) -> str:
    return make_dataset(str(tmp_path_factory.mktemp("toy-data")))


def trainer_args(data_list: str, out: str, iters: int = 4, extra: tuple = ()) -> list[str]:
    return TINY_MODEL + [
        "--data-file-list", data_list, "--split", "98,2,0", "--data-cache-path", os.path.join(out, "cache"),
        "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(iters), "--lr", "0.003",
        "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", "--zero-stage", "1", "--deepspeed",
        "--seed", "1234", "--metrics-file", os.path.join(out, "metrics.jsonl"), *extra]


def losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["iteration"]: r["lm_loss"] for r in map(json.loads, f) if "lm_loss" in r}


@pytest.fixture(scope="module")
def saved(data_list, tmp_path_factory):
    """One rank, ZeRO-1 proper (model file + ZeRO shard), 4 iterations, saves at 2 and 4."""
    out = str(tmp_path_factory.mktemp("ref"))
    save = os.path.join(out, "ckpt")
    run_trainer(trainer_args(data_list, out, extra=("--keep-zero-stage", "--save", save, "--save-interval", "2")))
    return SimpleNamespace(out=out, save=save, losses=losses(out))


def copy_ckpt(saved, tmp_path) -> str:
    dst = str(tmp_path / "ckpt")
    shutil.copytree(saved.save, dst, ignore=shutil.ignore_patterns("tensorboard"))
    return dst


def flip_byte(path: str, offset: int | None = None) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 if offset is None else offset)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


def load_config(load: str, **kw) -> Config:
    """The configuration of a run resuming `load`: the checkpoints' model (TINY_MODEL), these load flags."""
    model = {k: v for k, v in vars(build_parser().parse_args(TINY_MODEL)).items() if k in ck.ARCH_FIELDS}
    base = dict(model, load=load, load_tag=None, universal_checkpoint=False, fallback_to_intact_checkpoint=False,
                finetune=False, no_load_optim=False, exit_on_missing_checkpoint=False, zero_stage=1,
                pipeline_model_parallel_size=1)
    return Config.from_args(default_args(**{**base, **kw}))


# ----------------------------------------------------------------------------- units
def test_hashing_matches_independent_implementations(tmp_path):
    data = os.urandom(3 * cm.CHUNK + 12345)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert cm.hash_file(str(p), "xxh3_64") == xxhash.xxh3_64(data).hexdigest()
    assert cm.hash_file(str(p), "crc32") == f"{zlib.crc32(data):08x}"
    # fed in pieces (as the save does while writing) == whole
    h = cm.new_hasher("crc32")
    for i in range(0, len(data), 1000):
        h.update(data[i:i + 1000])
    assert h.hexdigest() == f"{zlib.crc32(data):08x}"


def test_problems_of_each_kind(tmp_path):
    tag = tmp_path / "global_step7"
    (tag / "sub").mkdir(parents=True)
    (tag / "a.pt").write_bytes(b"x" * 1000)
    (tag / "sub" / "b.pt").write_bytes(b"y" * 10)
    m = cm.write_manifest(str(tag), {}, "crc32", "global_step7", 7)
    assert m["files"] == {"a.pt": {"size": 1000, "digest": f"{zlib.crc32(b'x' * 1000):08x}", "rank": 0},
                          "sub/b.pt": {"size": 10, "digest": f"{zlib.crc32(b'y' * 10):08x}", "rank": 0}}
    assert cm.problems(str(tag), checksums=True) == []
    flip_byte(str(tag / "a.pt"), 500)
    assert cm.problems(str(tag)) == []  # same size: only a checksum sees it
    want = f"a.pt has checksum {zlib.crc32(b'x' * 500 + b'y' + b'x' * 499):08x}, the manifest says " \
           f"{zlib.crc32(b'x' * 1000):08x} (damaged or replaced)"
    assert cm.problems(str(tag), checksums=True) == [want]
    assert cm.problems(str(tag), checksums=True, only={"sub/b.pt"}) == []  # another rank's share
    (tag / "a.pt").write_bytes(b"x" * 999)
    assert cm.problems(str(tag)) == ["a.pt has 999 bytes, the manifest says 1000 (truncated)"]
    (tag / "a.pt").write_bytes(b"x" * 1000)
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"z")
    os.remove(tag / "sub" / "b.pt")
    assert cm.problems(str(tag), checksums=True) == [
        "zero_pp_rank_1_mp_rank_00_optim_states.pt is not part of this checkpoint (not in its manifest: a foreign "
        "or left-over file; remove it)", "sub/b.pt is missing"]
    (tag / "manifest.json").write_text("{not json")
    assert cm.problems(str(tag))[0].startswith("manifest.json is unreadable (JSONDecodeError")
    os.remove(tag / "manifest.json")
    assert cm.problems(str(tag), checksums=True) == []  # no manifest: an old checkpoint, not verified


def test_write_manifest_refuses_a_claimed_file_that_is_not_there(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"a")
    with pytest.raises(OSError, match=r"gone.pt: written by rank 1 but not in the checkpoint directory"):
        cm.write_manifest(str(tmp_path), {"gone.pt": {"size": 1, "digest": "0", "rank": 1}}, "crc32", "t", 1)


# ----------------------------------------------------------------------------- a real save
@pytest.mark.slow
def test_manifest_of_a_real_save(saved):
    for it in (2, 4):
        tag_dir = os.path.join(saved.save, f"global_step{it}")
        m = cm.read_manifest(tag_dir)
        assert (m["tag"], m["iteration"], m["algorithm"]) == (f"global_step{it}", it, "xxh3_64")
        assert sorted(m["files"]) == sorted(set(os.listdir(tag_dir)) - {"manifest.json"}) \
            == sorted([ck.ARGS_FILE, MODEL, SHARD])
        for name, e in m["files"].items():
            with open(os.path.join(tag_dir, name), "rb") as f:
                data = f.read()
            assert (e["size"], e["digest"], e["rank"]) == (len(data), xxhash.xxh3_64(data).hexdigest(), 0), name


@pytest.mark.slow
def test_damage_is_named_with_the_intact_tag(saved, tmp_path):
    """Each kind of damage to global_step4 (the one `latest` names): the start-up check (sizes) or
    --verify-checkpoint (checksums) names the file and global_step2; with the fallback flag the
    tag becomes global_step2."""
    cases = {
        "flip": (lambda d: flip_byte(os.path.join(d, MODEL)), f"{MODEL} has checksum "),
        "truncate": (lambda d: os.truncate(os.path.join(d, SHARD), 1000), f"{SHARD} has 1000 bytes, the manifest says"),
        "foreign": (lambda d: shutil.copy(os.path.join(d, SHARD), os.path.join(d, "zero_pp_rank_1_mp_rank_00_optim_"
                                                                                 "states.pt")),
                    "zero_pp_rank_1_mp_rank_00_optim_states.pt is not part of this checkpoint"),
        "swap": (lambda d: shutil.copy(os.path.join(saved.save, "global_step2", MODEL), os.path.join(d, MODEL)),
                 f"{MODEL} has"),
        "missing": (lambda d: os.remove(os.path.join(d, SHARD)), f"{SHARD} is missing"),
    }
    for kind, (damage, what) in cases.items():
        ckpt = str(tmp_path / kind)
        shutil.copytree(saved.save, ckpt, ignore=shutil.ignore_patterns("tensorboard"))
        damage(os.path.join(ckpt, "global_step4"))
        config = load_config(ckpt, verify_checkpoint=True)
        errs, changes = ck.check_checkpoint_files(config.checkpoint)
        assert changes == {}  # no fallback without the flag
        if kind == "flip" or (kind == "swap" and not errs):  # same size: only the checksums see it
            assert errs == []
            with pytest.raises(ArgumentError) as e:
                ck.verify_before_load(config, "global_step4")
            errs = [str(e.value)]
        assert len(errs) == 1 and "\n" not in errs[0], (kind, errs)
        assert errs[0].startswith(f"checkpoint {ckpt}/global_step4 is damaged: {what}"), (kind, errs[0])
        assert "load the newest intact checkpoint with --load-tag global_step2 (or add " \
               "--fallback-to-intact-checkpoint)" in errs[0], errs[0]
        # the CLI agrees: exit 1, the problem listed, global_step2 named
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "verify_checkpoint.py"), ckpt, "--all"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        assert p.returncode == 1, p.stdout + p.stderr
        assert "global_step4: DAMAGED" in p.stdout and "global_step2: OK" in p.stdout
        assert what in p.stdout and p.stdout.rstrip().endswith("newest intact: global_step2"), p.stdout
        config = config.replace(fallback_to_intact_checkpoint=True)
        errs, changes = ck.check_checkpoint_files(config.checkpoint)
        assert errs == []
        if not changes:  # same size: the checksums find it at load time
            changes = ck.verify_before_load(config, "global_step4")
        assert changes["load_tag"] == "global_step2" and "global_step4 is damaged" in changes["checkpoint_fallback"]
    # both damaged: nothing intact to offer
    ckpt = str(tmp_path / "truncate")
    os.truncate(os.path.join(ckpt, "global_step2", MODEL), 10)
    assert ck.check_checkpoint_files(load_config(ckpt).checkpoint) == ([
        f"checkpoint {ckpt}/global_step4 is damaged: {SHARD} has 1000 bytes, the manifest says "
        f"{os.path.getsize(os.path.join(saved.save, 'global_step4', SHARD))} (truncated); no other intact checkpoint "
        f"in {ckpt}: restore the files from a copy, or start from scratch"], {})
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "verify_checkpoint.py"), saved.save],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0 and p.stdout.startswith("global_step4: OK (3 files"), p.stdout


@pytest.mark.slow
def test_trainer_refuses_truncated_checkpoint_before_deepspeed(saved, data_list, tmp_path):
    ckpt = copy_ckpt(saved, tmp_path)
    os.truncate(os.path.join(ckpt, "global_step4", MODEL), 4096)
    out = str(tmp_path / "run")
    p = run_trainer(trainer_args(data_list, out, iters=6, extra=("--load", ckpt, "--save", ckpt)), check=False)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("ERROR:")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-3000:]
    assert errors[0].startswith(f"ERROR: checkpoint {ckpt}/global_step4 is damaged: {MODEL} has 4096 bytes")
    assert "--load-tag global_step2" in errors[0]
    assert "DeepSpeed" not in p.stderr and not os.path.exists(os.path.join(out, "metrics.jsonl"))


@pytest.mark.slow
def test_trainer_falls_back_to_intact_checkpoint(saved, data_list, tmp_path):
    """Bit flip in global_step4's model file, --verify-checkpoint --fallback-to-intact-checkpoint: loads
    global_step2 with a warning; iterations 3-4 repeat the reference run's losses exactly."""
    ckpt = copy_ckpt(saved, tmp_path)
    flip_byte(os.path.join(ckpt, "global_step4", MODEL))
    out = str(tmp_path / "run")
    p = run_trainer(trainer_args(data_list, out, extra=("--keep-zero-stage", "--load", ckpt, "--verify-checkpoint",
                                                        "--fallback-to-intact-checkpoint")))
    assert "WARNING: --fallback-to-intact-checkpoint: global_step4 is damaged (mp_rank_00_model_states.pt has " \
           "checksum" in p.stdout + p.stderr
    assert "loading global_step2 instead" in p.stdout + p.stderr
    got = losses(out)
    assert sorted(got) == [3, 4]
    for i in (3, 4):
        assert got[i] == pytest.approx(saved.losses[i], abs=1e-6), (i, got[i], saved.losses[i])


@pytest.mark.slow
def test_checkpoint_without_manifest_still_loads(saved, data_list, tmp_path):
    ckpt = copy_ckpt(saved, tmp_path)
    for it in (2, 4):
        os.remove(os.path.join(ckpt, f"global_step{it}", cm.MANIFEST))
    out = str(tmp_path / "run")
    p = run_trainer(trainer_args(data_list, out, iters=5, extra=("--keep-zero-stage", "--load", ckpt,
                                                                 "--verify-checkpoint", "--override-opt_param-scheduler")))
    assert sorted(losses(out)) == [5]  # resumed at 4
    assert "global_step4 has no manifest (written before manifests existed): its files are not verified" in p.stderr


@pytest.mark.slow
def test_two_rank_save_writes_one_complete_manifest(data_list, tmp_path):
    out = str(tmp_path / "run")
    save = os.path.join(out, "ckpt")
    run_trainer(trainer_args(data_list, out, iters=2, extra=("--save", save, "--save-interval", "2")), nproc=2,
                launcher="ranks")
    tag_dir = os.path.join(save, "global_step2")
    m = cm.read_manifest(tag_dir)
    shards = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    assert sorted(m["files"]) == sorted([ck.ARGS_FILE, MODEL, *shards]) \
        == sorted(set(os.listdir(tag_dir)) - {cm.MANIFEST})
    assert {n: e["rank"] for n, e in m["files"].items()} == {ck.ARGS_FILE: 0, MODEL: 0, shards[0]: 0, shards[1]: 1}
    for name, e in m["files"].items():
        with open(os.path.join(tag_dir, name), "rb") as f:
            data = f.read()
        assert (e["size"], e["digest"]) == (len(data), xxhash.xxh3_64(data).hexdigest()), name
    # --verify-checkpoint with 2 ranks (each checks half of the files, the problems are exchanged):
    # one byte of rank 1's shard flipped is found, and both ranks stop with the same line
    flip_byte(os.path.join(tag_dir, shards[1]))
    p = run_trainer(trainer_args(data_list, str(tmp_path / "load"), iters=4,
                                 extra=("--load", save, "--verify-checkpoint")), nproc=2, launcher="torchrun",
                    check=False)
    errors = [ln for ln in p.stderr.splitlines() if "ERROR:" in ln]
    assert p.returncode != 0 and errors, p.stderr[-3000:]
    assert errors[0].endswith(f"ERROR: checkpoint {save}/global_step2 is damaged: {shards[1]} has checksum "
                              f"{cm.hash_file(os.path.join(tag_dir, shards[1]), 'xxh3_64')}, the manifest says "
                              f"{m['files'][shards[1]]['digest']} (damaged or replaced); no other intact checkpoint "
                              f"in {save}: restore the files from a copy, or start from scratch"), errors
    assert "exitcode  : 2" in p.stderr  # (torchrun's summary: the rank's own exit status, no rank traceback)
