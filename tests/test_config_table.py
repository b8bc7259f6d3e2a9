"""megatron/observability/config_table.py: the start-up table's values and sources, and the warnings."""
from __future__ import annotations

import pytest

from distributed import TINY_MODEL
from megatron.arguments import build_parser, parse_args
from megatron.config import Config
from megatron.observability.config_table import config_rows, config_warnings, format_table, source_of


def args_for(extra: list[str], env: dict | None = None) -> Config:
    a = parse_args(TINY_MODEL + ["--data-path", "x", "--lr", "0.003"] + extra, env=env or {})
    a.padded_vocab_size, a.vocab_size_orig = 512, 500
    return Config.from_args(a)


def rows_by_name(a, env) -> dict:
    return {r.name: r for r in config_rows(a, 139_584, build_parser(), env=env)}


def test_values_and_sources():
    a = args_for(["--train-iters", "100", "--global-batch-size", "4", "--lr-warmup-iters", "10"])
    env = {"LR": "0.003", "HEADS": "4", "OPT": "lion", "TRAIN_TOKENS": "12800"}
    rows = rows_by_name(a, env)
    assert rows["learning rate"].source == "env LR"  # the user set LR and the value is LR's
    assert rows["attention heads"].source == "env HEADS"
    assert rows["optimizer"].source == "default" and rows["optimizer"].value == "adamw"  # OPT=lion did not reach it
    assert rows["train iterations"].source == "env TRAIN_TOKENS"
    assert rows["layers"].source == "flag" and rows["layers"].value == "2"
    assert rows["weight decay"].source == "default" and rows["weight decay"].value == "0.01"
    assert rows["gradient accumulation"].source == "derived" and rows["gradient accumulation"].value == "4"
    assert rows["tokens per step"].value == "128" and rows["train tokens"].value == "12,800"
    assert rows["parameters"].value == "0.14M"
    table = format_table(list(rows.values()))
    assert "schedule: learning rate" in table and table.splitlines()[0].split() == ["setting", "value", "source"]


def test_env_with_another_value_is_not_the_source():
    assert source_of("lr", 0.001, {"lr"}, {"LR": "0.003"}) == "flag"
    assert source_of("lr", 0.003, set(), {"LR": "3e-3"}) == "env LR"
    assert source_of("seq_length", 32, set(), {"SEQ_LEN": "32"}) == "env SEQ_LEN"


@pytest.mark.parametrize("extra,fragment", [
    (["--train-iters", "10", "--lr-warmup-iters", "10"], "warmup (10 iterations) is not shorter than the run"),
    (["--train-iters", "10", "--lr-warmup-fraction", "1.0"], "warmup (10 iterations)"),
    (["--train-iters", "10"], "tokens per optimizer step"),
    (["--train-iters", "10", "--log-interval", "50"], "--log-interval (50) > --train-iters (10)"),
    (["--train-iters", "10", "--lr-decay-iters", "5"], "the last 5 iterations run at the final LR"),
])
def test_warnings(extra, fragment):
    assert any(fragment in w for w in config_warnings(args_for(extra)))


def test_no_warnings_for_a_sensible_run():
    a = args_for(["--train-iters", "1000", "--global-batch-size", "512", "--lr-warmup-fraction", "0.05",
                  "--log-interval", "10", "--eval-interval", "100"])
    assert config_warnings(a) == []


@pytest.mark.parametrize("extra,env,stage", [
    ([], {}, 0),  # one rank, ZeRO-1 asked: nothing to partition
    (["--zero-stage", "2"], {}, 0),
    (["--tensor-model-parallel-size", "2"], {"WORLD_SIZE": "2"}, 0),  # all ranks in TP: one replica
    ([], {"WORLD_SIZE": "2"}, 1),  # two replicas: ZeRO partitions
    (["--keep-zero-stage"], {}, 1),
    (["--zero-stage", "3"], {}, 3),
    (["--bf16"], {}, 0),
    (["--bf16", "--global-batch-size", "8"], {}, 1),  # gradient accumulation: ZeRO sums in fp32
    (["--optimizer", "muon"], {}, 0),  # one Muon for every stage: the same update
    (["--universal-checkpoint", "--load", "{ckpt}"], {}, 1),  # DeepSpeed loads those into its ZeRO optimizer
    (["--cpu-optimizer"], {}, 1),  # offload is ZeRO's
    (["--deepspeed_config", "{ckpt}/offload.json"], {}, 1),
    (["--deepspeed_config", "{ckpt}/plain.json"], {}, 0),
])
def test_single_replica_zero_stage(extra, env, stage, tmp_path):
    """Which runs use stage 0 for ZeRO-1/2 with one data-parallel replica; the table says so."""
    (tmp_path / "global_step1_universal").mkdir()
    (tmp_path / "latest_universal").write_text("global_step1_universal")
    (tmp_path / "offload.json").write_text('{"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}')
    (tmp_path / "plain.json").write_text('{"zero_optimization": {"stage": 1}}')
    extra = [x.replace("{ckpt}", str(tmp_path)) for x in extra]
    a = args_for(["--micro-batch-size", "4", "--train-iters", "10", *extra], env=env)
    assert a.parallel.zero_stage == stage
    row = rows_by_name(a, env)["ZeRO stage"]
    if stage == 0:
        assert a.runtime.zero_stage_requested in (1, 2) and row.value.startswith("0 (asked ")
    else:
        assert a.runtime.zero_stage_requested is None and row.value == str(stage)


def test_zero3_memory_row(tmp_path):
    """ZeRO-3's memory settings, chosen by size unless the DeepSpeed config sets them: the table says which."""
    a = args_for(["--zero-stage", "3", "--train-iters", "2"])
    row = rows_by_name(a, {})["ZeRO-3 memory"].value
    assert row.startswith("sub_group_size 5e+06, stage3_max_live_parameters 5e+06, stage3_max_reuse_distance 5e+06, "
                          "stage3_prefetch_bucket_size 5e+06; by model size"), row
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"sub_group_size": 1000000000}}')
    a = args_for(["--zero-stage", "3", "--train-iters", "2", "--deepspeed_config", str(tmp_path / "ds.json")])
    assert rows_by_name(a, {})["ZeRO-3 memory"].value.startswith(
        "sub_group_size 1e+09 (the DeepSpeed config), stage3_max_live_parameters 5e+06,")
    assert "ZeRO-3 memory" not in rows_by_name(args_for(["--zero-stage", "2", "--train-iters", "2"]), {})


def test_zero3_fetch_row(tmp_path):
    """The unit ZeRO-3 gathers parameters in: a transformer layer where the model fits the live and reuse limits
    (the size rule's 5e6 for this small model), a module where a DeepSpeed config's limit is below the model."""
    assert rows_by_name(args_for(["--zero-stage", "3", "--train-iters", "2"]), {})["ZeRO-3 fetch"].value.startswith(
        "a transformer layer at a time")
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage3_max_live_parameters": 1000}}')
    a = args_for(["--zero-stage", "3", "--train-iters", "2", "--deepspeed_config", str(tmp_path / "ds.json")])
    assert rows_by_name(a, {})["ZeRO-3 fetch"].value.startswith("a module at a time")
    assert "ZeRO-3 fetch" not in rows_by_name(args_for(["--zero-stage", "1", "--train-iters", "2"]), {})


@pytest.mark.parametrize("record,extra,want", [
    ({"zero_stage": 3}, [], 1_000_000_000),  # written before the record: DeepSpeed's default then
    ({"zero_stage": 3, "zero3_sub_group_size": 20000}, [], 20000),
    ({"zero_stage": 3, "zero3_sub_group_size": 20000}, ["--no-load-optim"], 5_000_000),  # no state to load
    ({"zero_stage": 3, "zero3_sub_group_size": 20000}, ["--finetune"], 5_000_000),
])
def test_zero3_resume_keeps_the_checkpoints_sub_groups(tmp_path, record, extra, want):
    """DeepSpeed loads ZeRO-3 optimizer state only into the sub-groups it was saved from: a plain resume
    takes the checkpoint's sub-group size (recorded in its megatron_args.json; DeepSpeed's default for one
    written before), a start without its optimizer state the size rule."""
    import json  # noqa: PLC0415

    from megatron.deepspeed_config import build_ds_config  # noqa: PLC0415

    (tmp_path / "global_step4").mkdir()
    (tmp_path / "latest").write_text("global_step4")
    (tmp_path / "global_step4" / "megatron_args.json").write_text(json.dumps(record))
    a = args_for(["--zero-stage", "3", "--train-iters", "2", "--load", str(tmp_path), *extra])
    assert build_ds_config(a)["zero_optimization"]["sub_group_size"] == want
    row = rows_by_name(a, {})["ZeRO-3 memory"].value
    resumed = want != 5_000_000
    assert row.startswith(f"sub_group_size {want:.3g}{' (the checkpoint' + chr(39) + 's)' if resumed else ''}, "
                          "stage3_max_live_parameters 5e+06"), row
