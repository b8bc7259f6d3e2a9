"""The launcher and the optimizer registry agree (issue 21, item 5).

* every OPT value goes through `DRY_RUN=1 bash train_alcf.sh` and the trainer's own validation
  (`parse_args` of exactly the printed command and DeepSpeed config): accepted, or refused by the
  registry with a line naming the fix (a package to install, hardware that is missing);
* the names the launcher writes a DeepSpeed "optimizer" block for are exactly the registry's
  DeepSpeed-built names (`megatron.arguments.DS_BLOCK_TYPES`), with the block type the trainer builds;
* a block that DeepSpeed would ignore (a client optimizer with a block, or another type) is refused;
* `OPT=ds.adamw` trains end to end through the launcher on 2 ranks at ZeRO-1 and gives the same
  losses as `OPT=adamw` (torch.optim.AdamW): DeepSpeed's AdamW is the same math.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from distributed import make_dataset
from test_launcher import ROOT, SCRIPT, base_env, dry, env, wd  # noqa: F401  (fixtures)

from megatron.arguments import DS_BLOCK_TYPES, ArgumentError, parse_args
from megatron.deepspeed_config import OPTIMIZER_BLOCKS
from megatron.optimizer import optimizer_names


def test_launcher_blocks_are_the_registry_deepspeed_names(env):  # noqa: F811
    names = set(OPTIMIZER_BLOCKS)  # the OPT values the launcher's config (megatron/deepspeed_config.py) has a block for
    assert names == set(DS_BLOCK_TYPES) and names <= set(optimizer_names())
    for name in names:
        block = dry({**env, "OPT": name}).config["optimizer"]
        assert block["type"].lower() == DS_BLOCK_TYPES[name], (name, block)


def trainer_check(d, tmp_path) -> list[str]:
    """The trainer's validation of the printed command with the printed DeepSpeed config."""
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(json.dumps(d.config))
    script = next(n for n, t in enumerate(d.argv) if t.endswith(".py"))
    argv = [f"--deepspeed_config={cfg}" if t.startswith("--deepspeed_config=") else t for t in d.argv[script + 1:]]
    try:
        parse_args(argv, env={"WORLD_SIZE": "1"})
    except ArgumentError as e:
        return str(e).splitlines()
    return []


@pytest.mark.parametrize("name", optimizer_names())
def test_every_opt_through_dry_run_and_trainer_validation(env, wd, tmp_path, monkeypatch, name):  # noqa: F811
    monkeypatch.chdir(wd)  # the command's relative paths (checkpoints/...) are the working directory's
    d = dry({**env, "OPT": name})
    assert d.last("--optimizer") == name
    assert ("optimizer" in d.config) == (name in DS_BLOCK_TYPES)
    problems = trainer_check(d, tmp_path)
    # accepted, or refused by the registry itself with the fix (package / hardware missing here)
    assert all(line.startswith(f"--optimizer {name} ") for line in problems), problems


def test_a_block_deepspeed_would_ignore_is_refused(env, wd, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(wd)
    d = dry({**env, "OPT": "ds.adamw"})
    cfg = tmp_path / "ds_config.json"
    base = [t for t in d.argv[next(n for n, t in enumerate(d.argv) if t.endswith(".py")) + 1:]
            if not t.startswith("--deepspeed_config=")] + [f"--deepspeed_config={cfg}"]
    cfg.write_text(json.dumps(d.config))
    with pytest.raises(ArgumentError) as e:
        parse_args(base + ["--optimizer", "adamw"], env={"WORLD_SIZE": "1"})
    assert str(e.value) == (f"--deepspeed_config {cfg} has an \"optimizer\" block of type 'AdamW', but --optimizer "
                            "adamw builds its own optimizer and DeepSpeed would ignore the block: use --optimizer "
                            "ds.adamw (OPT=ds.adamw) or remove the block")
    cfg.write_text(json.dumps({**d.config, "optimizer": {"type": "Lamb", "params": {}}}))
    with pytest.raises(ArgumentError) as e:
        parse_args(base, env={"WORLD_SIZE": "1"})
    assert "of type 'Lamb', but --optimizer ds.adamw builds DeepSpeed's adamw: remove the block" in str(e.value)


def launch(tmp_path, opt: str, data_list: str) -> list[float]:
    """A real `bash train_alcf.sh` run: 2 ranks, ZeRO-1, the tiny preset, 3 iterations; its losses."""
    out = tmp_path / opt
    out.mkdir()
    e = base_env(WORKING_DIR=str(out), DATA_FILE_LIST=data_list, OPT=opt, NPROC="2", ZERO_STAGE="1",
                 MODEL_ARCH="tiny", TRAIN_ITERS="3", MICRO_BATCH="2", LR="0.003", LR_WARMUP_FRAC="0",
                 EVAL_ITERS="1", EVAL_INTERVAL="1000", SAVE_INTERVAL="1000", TOKENIZER_TYPE="NullTokenizer",
                 CKPT_DIR=str(out / "ckpt"), OMP_NUM_THREADS="1", NO_TENSORBOARD="1",
                 VIRTUAL_ENV=os.environ.get("VIRTUAL_ENV", ""), PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu",
                 TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", ""))
    p = subprocess.run(["bash", str(SCRIPT), "--vocab-size", "500", "--peak-tflops", "1"], env=e, cwd=out,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cfg = json.loads(next((out / "ds-configs").glob("*.json")).read_text())
    assert ("optimizer" in cfg) == (opt == "ds.adamw")
    with open(out / "ckpt" / "metrics.jsonl") as f:
        return [r["lm_loss"] for r in map(json.loads, f) if "lm_loss" in r]


@pytest.mark.slow
def test_ds_adamw_end_to_end_equals_torch_adamw(tmp_path):
    data_list = make_dataset(str(tmp_path / "data"))
    got, want = launch(tmp_path, "ds.adamw", data_list), launch(tmp_path, "adamw", data_list)
    assert len(got) == 3 and got[-1] < got[0]
    assert got == pytest.approx(want, abs=1e-6)
