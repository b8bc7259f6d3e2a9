"""megatron/deepspeed_config.py: the launcher's DeepSpeed config file (launch_config and its command line).

Expected configs are written out by hand from upstream's generateDSconfig (reference upstream-spec §2.7)
with this project's fixes (ALCF/notes/launcher.md); the goldens (tests/test_launch_golden.py) and the
launcher tests check the same file through `DRY_RUN=1 bash train_alcf.sh`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.deepspeed_config import launch_parser, main

ROOT = Path(__file__).resolve().parents[1]

# the launcher's trainer flags the file depends on, among others it ignores
TRAINER = ["--lr", "0.0002", "--lr-decay-style", "cosine", "--tokenizer-model", "google/gemma-7B", "--deepspeed",
           "--deepspeed_config=ds-configs/x.json", "--zero-stage=1", "--adam-beta1=0.9", "--adam-beta2=0.95",
           "--adam-eps=0.00001", "--clip-grad=1.0", "--global-batch-size=192", "--micro-batch-size=1",
           "--optimizer=adamw", "--pipeline-model-parallel-size=1", "--weight-decay=0.1", "--flops-profiler-step=3"]
PROFILER_OFF = {"enabled": False, "profile_step": 2, "module_depth": -1, "top_modules": 1, "detailed": True,
                "output_file": None}
HEAD = {"train_batch_size": 192, "train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "steps_per_print": 1,
        "gradient_accumulation_steps": 16, "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False, "flops_profiler": PROFILER_OFF}
SCALER = {"loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}


def build(*extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "megatron.deepspeed_config", "--gradient-accumulation-steps", "16",
                          *TRAINER, *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_bf16_zero1_aurora_default():
    got = build("--bf16", "--accelerators", "12", "--distributed-backend=ccl")
    assert list(got) == [*HEAD, "fp16", "bfloat16", "zero_optimization", "comms_logger"]  # the file's key order
    assert got == {**HEAD, "fp16": {"enabled": False, **SCALER}, "bfloat16": {"enabled": True},
                   "zero_optimization": {"stage": 1},
                   "comms_logger": {"enabled": False, "verbose": False, "debug": False}}


def test_fp16_zero3_ds_adamw_on_cpu():
    got = build("--fp16", "--zero-stage=3", "--optimizer=ds.adamw", "--lr", "0.001", "--zero-hpz-partition-size", "2",
                "--comms-logger")  # ZeRO-3's block has no comms logger (as upstream)
    assert got == {**HEAD, "communication_data_type": "fp32", "fp16": {"enabled": True, **SCALER},
                   "bfloat16": {"enabled": False, "loss_scale": 1.0},
                   "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1e-5,
                                                             "weight_decay": 0.1, "torch_adam": True}},
                   "zero_optimization": {
                       "stage": 3, "zero_hpz_partition_size": 2, "reduce_scatter": False,
                       "stage3_max_live_parameters": 3e9, "stage3_max_reuse_distance": 3e9,
                       "stage3_param_persistence_threshold": 1e5, "stage3_prefetch_bucket_size": 5e7,
                       "contiguous_gradients": True, "overlap_comm": True, "reduce_bucket_size": 90000000,
                       "sub_group_size": 1e9,
                       "offload_optimizer": {"device": "none", "buffer_count": 4, "pipeline_read": False,
                                             "pipeline_write": False, "pin_memory": True}}}
    assert isinstance(got["zero_optimization"]["stage3_max_live_parameters"], int)  # DeepSpeed's field is an int


def test_fp32_pipeline_onebitlamb_offload_profiler():
    got = build("--pipeline-model-parallel-size=2", "--optimizer=ds.onebitlamb", "--zero-stage=2", "--cpu-optimizer",
                "--flops-profiler", "--accelerators", "4", "--clip-grad=0.5")
    assert got == {**HEAD, "gradient_clipping": 0.5, "flops_profiler": {**PROFILER_OFF, "enabled": True},
                   "communication_data_type": "fp32",
                   "optimizer": {"type": "OneBitLamb", "params": {
                       "lr": 0.011, "max_coeff": 0.3, "min_coeff": 0.01, "freeze_step": 1000, "cuda_aware": False,
                       "comm_backend_name": "gloo", "coeff_beta": 0.9, "factor_max": 4.0, "factor_min": 0.5,
                       "factor_threshold": 0.1}},
                   "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                   "data_types": {"grad_accum_dtype": "fp32"},
                   "comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False}}
    # the optimizer's own AdamW with an accelerator is DeepSpeed's kernel; ZeRO 0 takes no offload
    assert build("--optimizer=ds.adamw", "--accelerators", "1")["optimizer"]["params"]["torch_adam"] is False
    assert build("--zero-stage=0", "--cpu-optimizer")["zero_optimization"] == {"stage": 0}


def test_write_creates_the_directory_and_matches_stdout(tmp_path, capsys):
    path = tmp_path / "ds-configs" / "ds_stage1_mb1_gb192_pp1_bf16.json"
    argv = ["--gradient-accumulation-steps", "16", *TRAINER, "--bf16"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert main(["--write", str(path), *argv]) == 0
    assert path.read_text() == printed and capsys.readouterr().out == ""
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_missing_flag_is_refused():
    out = subprocess.run([sys.executable, "-m", "megatron.deepspeed_config", "--gradient-accumulation-steps", "1",
                          "--lr", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "the following arguments are required: --global-batch-size" in out.stderr


def test_no_torch_import():
    """The launcher runs it before any environment is set up (DRY_RUN), with any python >= 3.10."""
    code = "import sys; import megatron.deepspeed_config; print(sorted(m for m in ('torch', 'numpy', 'deepspeed') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_trainer_spellings_are_the_trainers():
    """Each trainer flag the command line reads is the trainer's own flag: same spelling, destination and parsing."""
    arguments = pytest.importorskip("megatron.arguments")
    trainer = {s: a for a in arguments.build_parser()._actions for s in a.option_strings}
    group = next(g for g in launch_parser()._action_groups if g.title.startswith("trainer flags"))
    assert len(group._group_actions) == 15
    for a in group._group_actions:
        t = trainer[a.option_strings[0]]
        assert (a.dest, a.nargs, type(a.const)) == (t.dest, t.nargs, type(t.const)), a.option_strings
        if a.type is not None:
            for sample in ("3", "0.5", "gloo", "ds.adamw"):
                try:
                    mine = a.type(sample)
                except ValueError:
                    mine = ValueError
                try:
                    theirs = t.type(sample)
                except Exception:  # noqa: BLE001  (argparse type errors)
                    theirs = ValueError
                assert mine == theirs or a.type is str, (a.option_strings, sample, mine, theirs)
