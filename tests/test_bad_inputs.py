"""A table of bad inputs: each is refused with one clear ERROR line, a non-zero exit, within 10 s,
before anything is written (the run directory is unchanged).

Trainer flags, data lists, data files, tokenizer paths and checkpoints go through
`pretrain_gpt.py --check-args` (in-process: what the launcher runs before it creates anything);
a few go through the full trainer (subprocess, without --check-args) and through
`bash train_alcf.sh` (launcher env vars + the trainer's check). The launcher's own env-var
checks are tabled in tests/test_launcher.py (ERROR_CASES).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distributed import ROOT, TINY_MODEL, make_dataset, run_trainer

TOKENIZER_FLAGS = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "500"]
MODEL = [a for a in TINY_MODEL if a not in TOKENIZER_FLAGS]
assert MODEL + TOKENIZER_FLAGS == TINY_MODEL


def _pretrain_main():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_under_test", os.path.join(ROOT, "pretrain_gpt.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def snapshot(root: Path) -> dict:
    """Every path under root with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A good corpus plus broken variants of it (each its own prefix and one-line list)."""
    d = tmp_path_factory.mktemp("bad-data")
    make_dataset(str(d / "good"), n_docs=60)
    good = d / "good" / "toy_text_document"
    idx, binf = good.with_suffix(".idx").read_bytes(), good.with_suffix(".bin").read_bytes()

    def variant(name: str, idx_bytes: bytes | None, bin_bytes: bytes | None) -> None:
        (d / name).mkdir()
        if idx_bytes is not None:
            (d / name / "c.idx").write_bytes(idx_bytes)
        if bin_bytes is not None:
            (d / name / "c.bin").write_bytes(bin_bytes)
        (d / f"{name}.txt").write_text(f"1.0 {d / name / 'c'} c\n")

    variant("badmagic", b"NOTANIDX" + idx[8:], binf)
    variant("shortidx", idx[:5], binf)
    variant("truncidx", idx[: len(idx) // 2], binf)
    variant("truncbin", idx, binf[: len(binf) // 3])
    variant("noidx", None, binf)
    variant("nobin", idx, None)
    badver = bytearray(idx)
    badver[9:17] = np.uint64(7).tobytes()  # version field after the 9-byte magic
    variant("badversion", bytes(badver), binf)
    lists = {
        "weight_nan_text.txt": f"abc {good} toy\n",
        "four_fields.txt": f"1.0 {good} toy extra\n",
        "negative.txt": f"-1.0 {good} toy\n",
        "empty.txt": "# only a comment\n\n",
        "zero.txt": f"0 {good} toy\n",
        "missing_prefix.txt": f"1.0 {d / 'nowhere' / 'x'} toy\n",
        "infinite.txt": f"inf {good} toy\n",
    }
    for name, text in lists.items():
        (d / name).write_text(text)
    (d / "garbage.model").write_bytes(b"this is not a sentencepiece model")
    # checkpoints: another architecture, no 'latest', a 'latest' naming nothing, a plain one for --universal
    for name, files in {
        "other_arch": {"latest": "global_step5", "global_step5/megatron_args.json":
                       json.dumps({"num_layers": 4, "hidden_size": 128})},
        "no_latest": {"global_step3/megatron_args.json": "{}"},
        "dangling": {"latest": "global_step9", "global_step3/megatron_args.json": "{}"},
        "plain": {"latest": "global_step2", "global_step2/megatron_args.json": "{}"},
    }.items():
        for rel, text in files.items():
            p = d / "ckpt" / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    (d / "a_file").write_text("x")
    return d


def base_args(data: Path, run: Path, tokenizer=TOKENIZER_FLAGS) -> list[str]:
    return MODEL + list(tokenizer) + [
        "--data-file-list", str(data / "good" / "toy.txt"), "--split", "98,2,0",
        "--data-cache-path", str(run / "cache"), "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", "6", "--lr", "0.003", "--min-lr", "0.0003", "--lr-decay-style", "cosine",
        "--eval-interval", "1000", "--eval-iters", "2", "--zero-stage", "1", "--deepspeed", "--seed", "1",
        "--save", str(run / "ckpt"), "--metrics-file", str(run / "metrics.jsonl"),
    ]


D = "{data}"  # placeholder replaced by the data fixture's directory
# (id, extra trainer flags or a callable(base) -> argv, expected message fragment, WORLD_SIZE)
TRAINER_CASES = [
    ("num-layers-0", ["--num-layers", "0"], "--num-layers must be > 0", None),
    ("hidden-not-divisible", ["--hidden-size", "66"], "must be divisible by --num-attention-heads (4)", None),
    ("kv-heads", ["--num-key-value-heads", "3"], "divisible by --num-key-value-heads (3)", None),
    ("seq-gt-positions", ["--seq-length", "128"], "--max-position-embeddings (64) must be >= --seq-length (128)", None),
    ("gbs-not-multiple", ["--global-batch-size", "6"], "multiple of micro-batch-size", None),
    ("zero-stage-4", ["--zero-stage", "4"], "--zero-stage must be 0, 1, 2 or 3", None),
    ("lr-negative", ["--lr", "-1", "--min-lr", "-2"], "--lr must be a finite number >= 0", None),
    ("lr-nan", ["--lr", "nan"], "--lr must be a finite number >= 0", None),
    ("min-lr-above-lr", ["--min-lr", "1"], "--min-lr (1.0) must be <= --lr (0.003)", None),
    ("train-iters-0", ["--train-iters", "0"], "--train-iters must be > 0", None),
    ("iters-and-samples", ["--train-samples", "100"], "give exactly one of --train-iters and --train-samples", None),
    ("warmup-fraction", ["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1]", None),
    ("fp16-and-bf16", ["--fp16", "--bf16"], "--fp16 and --bf16 are mutually exclusive", None),
    ("tp-vs-world", ["--tensor-model-parallel-size", "3"], "not divisible by TP*PP*SP", "2"),
    ("rotary-percent", ["--rotary-percent", "0"], "--rotary-percent must be in (0, 1]", None),
    ("reset-attention-mask-with-sp", ["--reset-attention-mask", "--ds-sequence-parallel-size", "2"],
     "--reset-attention-mask is not supported with pipeline (PP > 1) or Ulysses (SP > 1)", "2"),
    ("save-interval-0", ["--save-interval", "0"], "--save-interval must be > 0", None),
    ("keep-last-n-0", ["--keep-last-n", "0"], "--keep-last-n must be >= 1", None),
    ("distributed-timeout-0", ["--distributed-timeout-minutes", "0"],
     "--distributed-timeout-minutes must be a finite number > 0 (got 0.0)", None),
    ("profile-steps", ["--profile_steps", "3,2"], "--profile_steps must be 'first,last'", None),
    ("max-skipped-0", ["--max-skipped-iterations", "0"], "--max-skipped-iterations must be >= 1", None),
    ("spike-factor", ["--loss-spike-factor", "-1"], "--loss-spike-factor must be a finite number >= 0", None),
    ("micro-batch-text", ["--micro-batch-size", "abc"], "argument --micro-batch-size: invalid int value: 'abc'", None),
    ("unknown-flag", ["--no-such-flag"], "unrecognized arguments: --no-such-flag", None),
    ("bad-choice", ["--lr-decay-style", "zigzag"], "argument --lr-decay-style", None),
    # data lists
    ("list-missing", ["--data-file-list", f"{D}/nope.txt"], "nope.txt: file not found (check DATA_FILE_LIST)", None),
    ("list-weight-text", ["--data-file-list", f"{D}/weight_nan_text.txt"], ":1: weight 'abc' is not a number", None),
    ("list-weight-inf", ["--data-file-list", f"{D}/infinite.txt"], ":1: weight 'inf' is not finite", None),
    ("list-four-fields", ["--data-file-list", f"{D}/four_fields.txt"], "expected 3 fields", None),
    ("list-negative", ["--data-file-list", f"{D}/negative.txt"], ":1: weight -1.0 is negative", None),
    ("list-empty", ["--data-file-list", f"{D}/empty.txt"], "no datasets listed (the list is empty)", None),
    ("list-all-zero", ["--data-file-list", f"{D}/zero.txt"], "all weights are zero", None),
    ("list-missing-prefix", ["--data-file-list", f"{D}/missing_prefix.txt"], "2 dataset file(s) not found", None),
    ("data-path-bad-weight", lambda a, d: _drop_list(a) + ["--data-path", "x", f"{d}/good/toy_text_document"],
     "--data-path: weights must be numbers", None),
    ("no-data", lambda a, d: _drop_list(a), "no training data: give --data-file-list", None),
    # data files
    ("idx-bad-magic", ["--data-file-list", f"{D}/badmagic.txt"], "not an MMIDIDX index", None),
    ("idx-too-short", ["--data-file-list", f"{D}/shortidx.txt"], "too short (5 bytes) to be an MMIDIDX index", None),
    ("idx-truncated", ["--data-file-list", f"{D}/truncidx.txt"], "truncated", None),
    ("idx-bad-version", ["--data-file-list", f"{D}/badversion.txt"], "unsupported MMIDIDX version 7", None),
    ("bin-truncated", ["--data-file-list", f"{D}/truncbin.txt"], "c.bin: truncated", None),
    ("idx-missing", ["--data-file-list", f"{D}/noidx.txt"], "1 dataset file(s) not found", None),
    ("bin-missing", ["--data-file-list", f"{D}/nobin.txt"], "c.bin", None),
    ("token-id-ge-vocab", lambda a, d: _tok(a, ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
                                              "--make-vocab-size-divisible-by", "4"]),
     ">= the model's vocabulary size 100", None),
    # tokenizers
    ("no-tokenizer", lambda a, d: _tok(a, []), "no tokenizer: give --tokenizer-type", None),
    ("sp-model-missing", lambda a, d: _tok(a, ["--tokenizer-type", "SentencePieceTokenizer",
                                              "--tokenizer-model", f"{d}/missing.model"]),
     "(a sentencepiece .model file) not found", None),
    ("sp-model-garbage", lambda a, d: _tok(a, ["--tokenizer-type", "SentencePieceTokenizer",
                                              "--tokenizer-model", f"{d}/garbage.model"]),
     "check TOKENIZER_MODEL / --tokenizer-model", None),
    ("hf-dir-missing", lambda a, d: _tok(a, ["--tokenizer-type", "HFTokenizer", "--tokenizer-model", f"{d}/nohf"]),
     "(a local Hugging Face tokenizer directory) not found", None),
    ("gpt2-no-vocab", lambda a, d: _tok(a, ["--tokenizer-type", "GPT2BPETokenizer"]), "needs --vocab-file", None),
    ("tokenizer-unknown", ["--tokenizer-type", "Klingon"], "argument --tokenizer-type", None),
    # checkpoints
    ("load-nothing", ["--load", f"{D}/ckpt/nothing", "--exit-on-missing-checkpoint"], "no such directory", None),
    ("load-a-file", ["--load", f"{D}/a_file"], "is a file; give the checkpoint directory", None),
    ("load-no-latest", ["--load", f"{D}/ckpt/no_latest"], "but no 'latest' file: pass --load-tag global_step3", None),
    ("load-dangling", ["--load", f"{D}/ckpt/dangling"], "global_step9 does not exist", None),
    ("load-other-arch", ["--load", f"{D}/ckpt/other_arch"], "num_layers: checkpoint 4 vs now 2", None),
    ("load-universal-unconverted", ["--load", f"{D}/ckpt/plain", "--universal-checkpoint"],
     "was not converted (no latest_universal)", None),
    ("load-tag-missing", ["--load", f"{D}/ckpt/plain", "--load-tag", "global_step77"],
     "global_step77 does not exist", None),
    # --save
    ("save-under-a-file", ["--save", f"{D}/a_file/ckpt"], "a_file is a file, not a directory", None),
]


def _drop_list(argv: list[str]) -> list[str]:
    i = argv.index("--data-file-list")
    return argv[:i] + argv[i + 2:]


def _tok(argv: list[str], tokenizer: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--tokenizer-type", "--vocab-size"):
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out + tokenizer


def test_table_is_large_enough():
    assert len(TRAINER_CASES) >= 40
    assert len({c[0] for c in TRAINER_CASES}) == len(TRAINER_CASES)


@pytest.mark.parametrize("case", TRAINER_CASES, ids=[c[0] for c in TRAINER_CASES])
def test_trainer_refuses(case, data, tmp_path, monkeypatch, capsys):
    name, extra, message, world = case
    run = tmp_path / "run"
    run.mkdir()
    argv = base_args(data, run)
    argv = extra(argv, str(data)) if callable(extra) else argv + [x.replace(D, str(data)) for x in extra]
    monkeypatch.setenv("WORLD_SIZE", world or "1")
    before_run, before_data = snapshot(run), snapshot(data)
    t0 = time.monotonic()
    try:
        rc = _pretrain_main()(argv + ["--check-args"])
    except SystemExit as e:  # argparse: usage + "error: ..." and exit 2
        rc = e.code
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert rc == 2, (name, err)
    assert message in err, (name, err)
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("ERROR:") or "error:" in ln]
    assert sum(message in ln for ln in errors) == 1, (name, err)  # one line per problem, this one among them
    assert all(ln.startswith(("ERROR:", "usage:", "check-args:", "  ")) or "error:" in ln
               for ln in err.splitlines() if ln.strip()), err  # nothing but the problems (no log noise)
    assert elapsed < 10, elapsed
    assert snapshot(run) == before_run and snapshot(data) == before_data


def test_good_configuration_passes_check(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _pretrain_main()(base_args(data, tmp_path) + ["--check-args"]) == 0
    assert "check-args: OK" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # --check-args writes nothing (not even --save)


def test_all_problems_listed_together(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = base_args(data, tmp_path) + ["--num-layers", "0", "--zero-stage", "7", "--min-lr", "1", "--check-args"]
    assert _pretrain_main()(argv) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 3, errors


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_save_refused(data, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = base_args(data, tmp_path) + ["--save", str(ro / "ckpt"), "--check-args"]
    assert _pretrain_main()(argv) == 2
    assert "is not writable" in capsys.readouterr().err


def test_read_only_save_refused_unit(tmp_path, monkeypatch):
    """The --save check itself (works as root too: os.access is replaced by a read-only answer)."""
    from megatron.arguments import save_dir_problems

    assert save_dir_problems(str(tmp_path / "a" / "b")) == []
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    (msg,) = save_dir_problems(str(tmp_path / "a" / "b"))
    assert f"{tmp_path} is not writable" in msg and "--save" in msg


# ------------------------------------------------------------------------------------------------
# the full trainer (no --check-args) refuses bad data files in one line too
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("extra,message", [
    (["--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--make-vocab-size-divisible-by", "4"],
     ">= the model's vocabulary size 100"),  # check_data_vocab opens every .idx/.bin, before DeepSpeed
], ids=["token-id-ge-vocab"])
def test_trainer_without_check_refuses_bad_data(data, tmp_path, extra, message):
    argv = base_args(data, tmp_path) + [x.replace("{data}", str(data)) for x in extra]
    # Without --check-args the trainer meets the bad data after its process group is up, so no time bound
    # here: on a fresh venv that first start also JIT-builds DeepSpeed's shm op once (~30 s). The launcher
    # runs --check-args first (tests below), which is what keeps user errors fast.
    proc = run_trainer(argv, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------
# through the launcher: its env-var checks, then the trainer's --check-args, before any directory
# ------------------------------------------------------------------------------------------------
def launcher(env_extra: dict, wd: Path) -> subprocess.CompletedProcess:
    venv = Path(sys.prefix)
    env = {"PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(wd),
           "LANG": "C.UTF-8", "ALCF_HOSTNAME": "testbox", "ALCF_CPUINFO": os.environ["ALCF_CPUINFO"],
           "WORKING_DIR": str(wd), "VIRTUAL_ENV": str(venv),
           "PYTHON": sys.executable, "TRAIN_ITERS": "10", "NLAYERS": "2", "HIDDEN": "64", "HEADS": "4",
           "NUM_KV_HEAD": "2", "SEQ": "32", "MICRO_BATCH": "2", "GLOBAL_BATCH": "2",
           "TOKENIZER_TYPE": "NullTokenizer", "TORCH_EXTENSIONS_DIR": os.path.join(sys.prefix, "torch_extensions")}
    env.update(env_extra)
    return subprocess.run(["bash", os.path.join(ROOT, "train_alcf.sh"), "--vocab-size", "500"], env=env, cwd=wd,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name,env_extra,message", [
    ("bad-magic", {"DATA_FILE_LIST": "{data}/badmagic.txt"}, "not an MMIDIDX index"),
    ("missing-bin", {"DATA_FILE_LIST": "{data}/missing_prefix.txt"}, "dataset file(s) not found"),
    ("tokenizer-missing", {"DATA_FILE_LIST": "{data}/good/toy.txt", "TOKENIZER_TYPE": "SentencePieceTokenizer",
                           "TOKENIZER_MODEL": "{data}/missing.model"}, "(a sentencepiece .model file) not found"),
    ("env-and-trainer", {"DATA_FILE_LIST": "{data}/good/toy.txt", "LR": "abc"}, "LR='abc' is not a number"),
], ids=lambda x: x if isinstance(x, str) and not x.startswith("{") else None)
def test_launcher_refuses_before_creating_anything(data, tmp_path, name, env_extra, message):
    env_extra = {k: v.replace("{data}", str(data)) for k, v in env_extra.items()}
    before = snapshot(tmp_path)
    t0 = time.monotonic()
    p = launcher(env_extra, tmp_path)
    assert time.monotonic() - t0 < 10 + 5  # + the environment probe of ALCF/env.sh
    assert p.returncode == 2, (name, p.stdout[-2000:], p.stderr[-3000:])
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("ERROR:")]
    assert len(errors) == 1 and message in errors[0], (name, p.stderr[-3000:])
    assert "Traceback" not in p.stderr
    assert snapshot(tmp_path) == before  # no logs/, checkpoints/, ds-configs/, .env
