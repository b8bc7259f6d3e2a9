"""No accepted flag or environment variable without an effect (issue 21, item 4).

Every action of the trainer's argument parser (`megatron.arguments.build_parser()._actions`) and
every environment variable the launcher reads (ALCF/helpers.sh, train_alcf.sh, ALCF/env.sh), plus
the names upstream's Python side reads, must be in exactly one table:

* EFFECT / ENV_EFFECT: name -> "tests/<file>::<test function>" showing what it does. The audit
  checks that the test exists, that its file names the flag (option or attribute) or variable,
  and, for a flag, that the code reads its attribute outside `add_argument`;
* REFUSED / ENV_REFUSED: name -> the exact one-line message; the audit runs the validation
  (`parse_args`, or the launcher's DRY_RUN) and finds that line;
* NO_OP: name -> why accepting it and doing nothing is honest. Only flags that select a kernel
  or an engine, never the math; the audit checks the code never reads them.

Adding a flag or a launcher variable without a row here fails `test_every_parser_flag_is_classified`
/ `test_every_launcher_variable_is_classified`. Add one dict entry per new flag.

Which launcher variables count: a name read with a default (`${NAME:-...}`, `${NAME-...}`,
`${NAME:+...}`, `${NAME:=...}`) or given to `_alcf_default` / `_alcf_alias` is a setting a user can
give. Variables the launcher assigns itself and reads plainly (`$DP`, `$RUN_NAME`...) are its
internal state. NOT_SETTINGS lists the few defaulted names that belong to the shell, the Python
environment or the launcher's own state; each is checked to be set by the launcher or by that
environment, never a user setting.

The end of the file holds the small tests of flags that no other test file covers.
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
from distributed import TINY_MODEL, make_dataset, run_trainer
from test_launcher import POLARIS_HOST, ROOT, SCRIPT, base_env, dry, env, hostfile, wd  # noqa: F401  (fixtures)

from megatron.config import Config
from megatron.arguments import REFUSED_ENV, REFUSED_FLAGS, ArgumentError, build_parser, parse_args

TESTS = os.path.dirname(os.path.abspath(__file__))
BASE = TINY_MODEL + ["--lr", "1e-3", "--train-iters", "3", "--data-path", "x"]

# flag -> the test that shows its effect
EFFECT = {
    "--num-layers": "test_activation_checkpointing.py::test_flags",
    "--hidden-size": "test_activation_checkpointing.py::test_flags",
    "--ffn-hidden-size": "test_launcher.py::test_defaults_7b",
    "--num-attention-heads": "test_activation_checkpointing.py::test_flags",
    "--num-key-value-heads": "test_launcher.py::test_defaults_7b",
    "--kv-channels": "test_model.py::test_rotary_percent_half_against_hand_computed_attention",
    "--max-position-embeddings": "test_launcher.py::test_defaults_7b",
    "--seq-length": "test_activation_checkpointing.py::test_flags",
    "--use-rotary-position-embeddings": "test_model.py::test_llama_incompatible_configs_rejected",
    "--rotary-position-embeddings-theta": "test_launcher.py::test_defaults_7b",
    "--rotary-percent": "test_model.py::test_llama_incompatible_configs_rejected",
    "--normalization": "test_launcher.py::test_defaults_7b",
    "--layernorm-epsilon": "test_model.py::test_logits_and_loss_match_hf",
    "--swiglu": "test_launcher.py::test_defaults_7b",
    "--disable-bias-linear": "test_model.py::test_logits_and_loss_match_hf",
    "--untie-embeddings-and-output-weights": "test_launcher.py::test_defaults_7b",
    "--attention-dropout": "test_launcher.py::test_defaults_7b",
    "--hidden-dropout": "test_launcher.py::test_defaults_7b",
    "--make-vocab-size-divisible-by": "test_bad_inputs.py::test_trainer_without_check_refuses_bad_data",
    "--bf16": "test_config_table.py::test_single_replica_zero_stage",
    "--fp16": "test_fp16.py::test_fp16_zero_stages_match_fp32",
    "--verify-checkpoint": "test_checkpoint_manifest.py::test_damage_is_named_with_the_intact_tag",
    "--fallback-to-intact-checkpoint": "test_checkpoint_manifest.py::test_trainer_falls_back_to_intact_checkpoint",
    "--skip-memory-check": "test_preflight_memory.py::test_refuse_warn_skip",
    "--loss-scale": "test_fp16.py::test_flags_map_to_the_deepspeed_block_and_override_the_launcher_json",
    "--initial-loss-scale": "test_fp16.py::test_flags_map_to_the_deepspeed_block_and_override_the_launcher_json",
    "--min-loss-scale": "test_fp16.py::test_flags_map_to_the_deepspeed_block_and_override_the_launcher_json",
    "--loss-scale-window": "test_fp16.py::test_flags_map_to_the_deepspeed_block_and_override_the_launcher_json",
    "--hysteresis": "test_fp16.py::test_flags_map_to_the_deepspeed_block_and_override_the_launcher_json",
    "--seed": "test_lr_finder.py::test_lr_finder_end_to_end",
    "--init-method-std": "test_guide_lr_commands.py::test_lr_finder_then_train_at_the_suggestion",
    "--adjust-word-embedding-init": "test_guide_lr_commands.py::test_lr_finder_then_train_at_the_suggestion",
    "--word-embedding-init-std": "test_guide_lr_commands.py::test_lr_finder_then_train_at_the_suggestion",
    "--init-method-xavier-uniform": "test_mup.py::test_problems",
    "--enable-mup": "test_launcher_mup.py::test_no_mup_flags_by_default",
    "--mup-base-width": "test_launcher_mup.py::test_no_mup_flags_by_default",
    "--mup-width-multiplier": "test_mup.py::test_problems",
    "--mup-input-alpha": "test_mup.py::test_forward_multipliers_against_direct_computation",
    "--mup-output-alpha": "test_mup.py::test_from_parsed_arguments",
    "--mup-attn-alpha": "test_mup.py::test_forward_multipliers_against_direct_computation",
    "--enable-depth-scale": "test_launcher_mup.py::test_no_mup_flags_by_default",
    "--depth-base": "test_launcher_mup.py::test_no_mup_flags_by_default",
    "--depth-multiplier": "test_mup.py::test_multiplier_table_hand_computed",
    "--depth-alpha": "test_launcher_mup.py::test_mup_base_width_and_depth_base",
    "--micro-batch-size": "test_config_table.py::test_single_replica_zero_stage",
    "--global-batch-size": "test_config_table.py::test_values_and_sources",
    "--train-iters": "test_activation_checkpointing.py::test_flags",
    "--train-samples": "test_optimizer_param_scheduler.py::test_builder_errors",
    "--train-tokens": "test_mix_datasets.py::test_check_and_summary",
    "--eval-interval": "test_config_table.py::test_no_warnings_for_a_sensible_run",
    "--eval-iters": "test_launcher.py::test_defaults_7b",
    "--eval-on-start": "test_launcher.py::test_defaults_7b",
    "--skip-train": "test_flag_audit.py::test_skip_train_save_and_reset_flags",
    "--exit-interval": "test_checkpoint_io.py::test_injected_enospc_stops_run_and_keeps_latest",
    "--exit-duration-in-mins": "test_flag_audit.py::test_exit_duration_in_mins",
    "--exit-signal-handler": "test_checkpointing.py::test_sigterm_saves_and_exits_cleanly",
    "--kill-switch-file": "test_launcher.py::test_value_with_spaces_stays_one_argument",
    "--max-skipped-iterations": "test_numerics.py::test_k_skips_in_a_row_abort_with_checkpoint",
    "--loss-spike-factor": "test_numerics.py::test_loss_spike_logged",
    "--check-args": "test_bad_inputs.py::test_trainer_refuses",
    "--checkpoint-activations": "test_activation_checkpointing.py::test_flags",
    "--checkpoint-num-layers": "test_activation_checkpointing.py::test_flags",
    "--deepspeed-activation-checkpointing": "test_activation_checkpointing.py::test_flags",
    "--recompute-granularity": "test_activation_checkpointing.py::test_flags",
    "--compile": "test_compile_default.py::test_compile_flags",
    "--no-compile": "test_compile_default.py::test_compile_flags",
    "--optimizer": "test_config_table.py::test_single_replica_zero_stage",
    "--weight-decay": "test_launcher.py::test_defaults_7b",
    "--start-weight-decay": "test_optimizer_param_scheduler.py::test_scheduler_validation",
    "--end-weight-decay": "test_optimizer_param_scheduler.py::test_scheduler_validation",
    "--weight-decay-incr-style": "test_optimizer_param_scheduler.py::test_scheduler_validation",
    "--clip-grad": "test_launcher.py::test_defaults_7b",
    "--adam-beta1": "test_launcher.py::test_defaults_7b",
    "--adam-beta2": "test_launcher.py::test_defaults_7b",
    "--adam-eps": "test_launcher.py::test_defaults_7b",
    "--sgd-momentum": "test_convert_checkpoint.py::test_non_adam_state_sgd_momentum",
    "--cpu-optimizer": "test_flag_audit.py::test_cpu_optimizer_offloads",
    "--grad-accum-dtype": "test_grad_accum_dtype.py::test_two_ranks_keep_bf16_gradients_at_every_stage",
    "--malloc-mmap-threshold": "test_allocator.py::test_fixed_threshold_returns_freed_blocks",
    "--allocator": "test_allocator.py::test_mimalloc_trainer_reexecutes_itself_with_the_library",
    # fp32 gradients are the default with or without it (test_fp32_gradient_reduction_is_always_on); with
    # --grad-accum-dtype bf16/fp16 it is a contradiction, refused
    "--accumulate-allreduce-grads-in-fp32": "test_grad_accum_dtype.py::test_refusals_name_the_fix",
    "--sophiag-beta1": "test_optimizer_sophia.py::test_hessian_refreshes_exactly_every_k_iterations_and_matches_gnb_by_hand",
    "--sophiag-beta2": "test_optimizer_sophia.py::test_hessian_refreshes_exactly_every_k_iterations_and_matches_gnb_by_hand",
    "--sophiag-rho": "test_optimizer_sophia.py::test_update_uses_the_hessian_not_lr_sign_m",
    "--sophiag-hessian-interval": "test_optimizer_registry.py::test_every_name_steps_or_is_refused_at_startup",
    "--dshampooadamw-max-preconditioner-dim": "test_flag_audit.py::test_dshampoo_flags_reach_distributed_shampoo",
    "--dshampooadamw-precondition-freq": "test_flag_audit.py::test_dshampoo_flags_reach_distributed_shampoo",
    "--dshampooadamw-use-decoupled-weight-decay": "test_flag_audit.py::test_dshampoo_flags_reach_distributed_shampoo",
    "--dshampooadamw-eps": "test_flag_audit.py::test_dshampoo_flags_reach_distributed_shampoo",
    "--muon-momentum": "test_optimizer_muon.py::test_parity_with_torch_muon_match_rms_adamw",
    "--muon-nesterov": "test_optimizer_muon.py::test_ns_steps_and_nesterov_flags_reach_the_update",
    "--muon-ns-steps": "test_optimizer_muon.py::test_ns_steps_and_nesterov_flags_reach_the_update",
    "--muonadamw-beta1": "test_optimizer_muon.py::test_aux_adamw_matches_torch_adamw",
    "--muonadamw-beta2": "test_optimizer_muon.py::test_aux_adamw_matches_torch_adamw",
    "--muonadamw-eps": "test_optimizer_muon.py::test_aux_adamw_matches_torch_adamw",
    "--muonclip-t": "test_optimizer_registry.py::test_muonclip_through_the_loop_hook_clips_at_muonclip_t",
    "--muonclip-alpha": "test_optimizer_muon.py::test_muonclip_fires_and_bounds_max_logit",
    "--schedulefree-for-each": "test_flag_audit.py::test_schedulefree_for_each",
    "--ademamix-beta3": "test_optimizer_parity.py::test_ademamix_vs_pytorch_optimizer",
    "--ademamix-alpha": "test_optimizer_parity.py::test_ademamix_vs_pytorch_optimizer",
    "--ademamix-warmup-iters": "test_optimizer_parity.py::test_ademamix_vs_pytorch_optimizer",
    "--lr": "test_activation_checkpointing.py::test_flags",
    "--min-lr": "test_bad_inputs.py::test_all_problems_listed_together",
    "--lr-decay-style": "test_convert_checkpoint.py::test_universal_dp2_to_dp1",
    "--lr-decay-iters": "test_config_table.py::test_warnings",
    "--lr-decay-samples": "test_optimizer_param_scheduler.py::test_builder_sample_units",
    "--lr-decay-tokens": "test_optimizer_param_scheduler.py::test_state_dict_keys",
    "--lr-warmup-fraction": "test_config_table.py::test_warnings",
    "--lr-warmup-iters": "test_config_table.py::test_values_and_sources",
    "--lr-warmup-samples": "test_optimizer_param_scheduler.py::test_builder_sample_units",
    "--lr-warmup-tokens": "test_optimizer_param_scheduler.py::test_state_dict_keys",
    "--lr-constant-tokens": "test_flag_audit.py::test_schedule_flag_changes_the_lr_curve",
    "--lr-constant-fraction": "test_flag_audit.py::test_schedule_flag_changes_the_lr_curve",
    "--lr-cooldown-tokens": "test_flag_audit.py::test_schedule_flag_changes_the_lr_curve",
    "--lr-cooldown-fraction": "test_flag_audit.py::test_schedule_flag_changes_the_lr_curve",
    "--constant-lr": "test_optimizer_param_scheduler.py::test_spec_validation",
    "--timescale": "test_optimizer_param_scheduler.py::test_spec_validation",
    "--lr_constant_plus_cooldown": "test_convert_checkpoint.py::test_cpt_phase2_constant_plus_cooldown",
    "--lr_constant_plus_cooldown_frac": "test_convert_checkpoint.py::test_cpt_phase2_constant_plus_cooldown",
    "--lr-cooldown-iters": "test_optimizer_param_scheduler.py::test_upstream_cooldown_tool_starts_the_cooldown_at_R_not_S",
    "--lr-cooldown-start-iter": "test_optimizer_param_scheduler.py::test_upstream_cooldown_tool_starts_the_cooldown_at_R_not_S",
    "--lr-wsd-decay-iters": "test_optimizer_param_scheduler.py::test_builder_wsd",
    "--lr-wsd-decay-samples": "test_flag_audit.py::test_schedule_flag_changes_the_lr_curve",
    "--lr-wsd-decay-style": "test_optimizer_param_scheduler.py::test_spec_validation",
    "--lr-finder": "test_guide_lr_commands.py::test_lr_finder_then_train_at_the_suggestion",
    "--lr-finder-min": "test_lr_finder.py::test_bad_finder_flags_are_refused",
    "--lr-finder-max": "test_lr_finder.py::test_finder_drives_every_group_and_records_the_lr_each_step_used",
    "--lr-finder-fraction": "test_lr_finder.py::test_bad_finder_flags_are_refused",
    "--lr-finder-stop-factor": "test_lr_finder.py::test_bad_finder_flags_are_refused",
    "--lr-finder-beta": "test_flag_audit.py::test_lr_finder_beta",
    "--override-opt_param-scheduler": "test_checkpointing.py::test_sigkill_during_saves_never_breaks_latest",
    "--use-checkpoint-opt_param-scheduler": "test_launcher.py::test_defaults_7b",
    "--save": "test_bad_inputs.py::test_good_configuration_passes_check",
    "--save-interval": "test_checkpointing.py::test_exact_resume",
    "--no-save-optim": "test_flag_audit.py::test_skip_train_save_and_reset_flags",
    "--no-save-rng": "test_flag_audit.py::test_skip_train_save_and_reset_flags",
    "--load": "test_checkpoint_io.py::test_trainer_refuses_malicious_checkpoint",
    "--load-tag": "test_checkpointing.py::test_bad_load_messages",
    "--no-load-optim": "test_checkpointing.py::test_no_load_flags_and_finetune",
    "--no-load-rng": "test_checkpointing.py::test_no_load_flags_and_finetune",
    "--no-load-lr-state": "test_checkpointing.py::test_no_load_flags_and_finetune",
    "--finetune": "test_checkpointing.py::test_no_load_flags_and_finetune",
    "--use-checkpoint-args": "test_flag_audit.py::test_use_checkpoint_args",
    "--exit-on-missing-checkpoint": "test_checkpointing.py::test_bad_load_messages",
    "--universal-checkpoint": "test_checkpoint_io.py::test_trainer_refuses_malicious_universal_atom",
    "--reset-iteration": "test_flag_audit.py::test_skip_train_save_and_reset_flags",
    "--keep-last-n": "test_checkpointing.py::test_bad_load_messages",
    "--unsafe-checkpoint-load": "test_checkpoint_io.py::test_trainer_refuses_malicious_checkpoint",
    "--data-path": "test_activation_checkpointing.py::test_flags",
    "--data-file-list": "test_bench.py::test_zero_overlap_and_bucket_flags_reach_the_deepspeed_config",
    "--shuffle-sample-in-corpus": "test_launcher.py::test_defaults_7b",
    "--blend-sample-in-corpus": "test_blendable_dataset.py::test_blend_sample_in_corpus",
    "--split": "test_gpt_dataset.py::test_split_bounds_errors",
    "--data-cache-path": "test_launcher.py::test_defaults_7b",
    "--num-workers": "test_lr_finder.py::test_lr_finder_end_to_end",
    "--dataloader-type": "test_samplers.py::test_cyclic_epochs_are_seeded_permutations_of_each_rank_bucket",
    "--tokenizer-type": "test_bad_inputs.py::test_trainer_without_check_refuses_bad_data",
    "--tokenizer-model": "test_launcher.py::test_defaults_7b",
    "--trust-remote-code": "test_flag_audit.py::test_trust_remote_code_reaches_autotokenizer",
    "--vocab-file": "test_tokenizer.py::test_gpt2_bpe_and_hf",
    "--merge-file": "test_tokenizer.py::test_gpt2_bpe_and_hf",
    "--vocab-size": "test_bad_inputs.py::test_trainer_without_check_refuses_bad_data",
    "--eod-mask-loss": "test_model.py::test_trainer_forward_loss_applies_reset_flags",
    "--reset-position-ids": "test_model.py::test_document_attention_mask_equals_separate_documents",
    "--reset-attention-mask": "test_model.py::test_document_attention_mask_equals_separate_documents",
    "--tensor-model-parallel-size": "test_config_table.py::test_single_replica_zero_stage",
    "--pipeline-model-parallel-size": "test_launcher.py::test_defaults_7b",
    "--ds-sequence-parallel-size": "test_launcher.py::test_defaults_7b",
    "--sequence-parallel": "test_tensor_parallel.py::test_trainer_tp2_sequence_parallel_recompute_zero2",
    "--no-pipeline-parallel": "test_launcher.py::test_defaults_7b",
    "--zero-stage": "test_bad_inputs.py::test_all_problems_listed_together",
    "--keep-zero-stage": "test_checkpointing.py::test_exact_resume",
    "--distributed-backend": "test_launcher.py::test_defaults_7b",
    "--distributed-timeout-minutes": "test_dist_faults.py::test_hung_rank_times_out",
    "--local-rank": "test_dist_faults.py::test_killed_rank_under_launcher",
    "--overlap-grad-reduce": "test_bench.py::test_zero_overlap_and_bucket_flags_reach_the_deepspeed_config",
    "--ddp-bucket-size": "test_bench.py::test_zero_overlap_and_bucket_flags_reach_the_deepspeed_config",
    "--deepspeed_config": "test_bench.py::test_zero_overlap_and_bucket_flags_reach_the_deepspeed_config",
    "--log-interval": "test_config_table.py::test_warnings",
    "--timing-log-level": "test_launcher.py::test_defaults_7b",
    "--timing-log-option": "test_training_log.py::test_metrics_file_replaced_by_a_fresh_run_and_appended_on_resume",
    "--tensorboard-dir": "test_launcher.py::test_defaults_7b",
    "--tensorboard-log-interval": "test_training_log.py::test_tensorboard_log_interval_and_queue_size",
    "--tensorboard-queue-size": "test_training_log.py::test_tensorboard_log_interval_and_queue_size",
    "--log-timers-to-tensorboard": "test_launcher.py::test_defaults_7b",
    "--log-batch-size-to-tensorboard": "test_training_log.py::test_tensorboard_flag_adds_or_removes_its_scalar",
    "--log-optimizer-states-to-tensorboard": "test_launcher.py::test_defaults_7b",
    "--log-world-size-to-tensorboard": "test_training_log.py::test_tensorboard_flag_adds_or_removes_its_scalar",
    "--log-validation-ppl-to-tensorboard": "test_training_log.py::test_tensorboard_flag_adds_or_removes_its_scalar",
    "--log-memory-to-tensorboard": "test_training_log.py::test_tensorboard_flag_adds_or_removes_its_scalar",
    "--log-params-norm": "test_weight_stats.py::test_every_layout_gives_the_reference_values",
    "--log-num-zeros-in-grad": "test_weight_stats.py::test_every_layout_gives_the_reference_values",
    "--no-log-learnig-rate-to-tensorboard": "test_training_log.py::test_tensorboard_flag_adds_or_removes_its_scalar",
    "--no-log-loss-scale-to-tensorboard": "test_training_log.py::test_tensorboard_flag_adds_or_removes_its_scalar",
    "--wandb-project": "test_training_log.py::test_wandb_absent_or_disabled_gives_no_run",
    "--wandb-exp-name": "test_launcher.py::test_value_with_spaces_stays_one_argument",
    "--wandb-save-dir": "test_training_log.py::test_wandb_absent_or_disabled_gives_no_run",
    "--metrics-file": "test_checkpoint_io.py::test_metrics_disk_full_tmpfs",
    "--peak-tflops": "test_mfu.py::test_flag_wins_and_cpu_peak_is_measured",
    "--profile": "test_training_log.py::test_torch_profiler_trace_and_deepspeed_flops_profile",
    "--profile_steps": "test_training_log.py::test_torch_profiler_trace_and_deepspeed_flops_profile",
    "--profile-ranks": "test_training_log.py::test_torch_profiler_trace_and_deepspeed_flops_profile",
    "--trace-dir": "test_training_log.py::test_torch_profiler_trace_and_deepspeed_flops_profile",
    "--flops-profiler-step": "test_training_log.py::test_torch_profiler_trace_and_deepspeed_flops_profile",
}

# flag -> (extra arguments that make validation refuse it, the exact message); arguments to drop from BASE
REFUSED = {
    **{flag: ([flag], REFUSED_FLAGS[dest]) for flag, dest in (
        ("--cpu_torch_adam", "cpu_torch_adam"), ("--ds_fused_adam", "ds_fused_adam"), ("--mmap-warmup", "mmap_warmup"),
        ("--data-parallel-random-init", "data_parallel_random_init"), ("--no-initialization", "no_initialization"),
        ("--openai-gelu", "openai_gelu"), ("--embedding-weights-in-fp32", "embedding_weights_in_fp32"),
        ("--attention-softmax-in-fp32", "attention_softmax_in_fp32"))},
    "--DDP-impl": (["--DDP-impl", "torch"], "--DDP-impl: DeepSpeed is the data-parallel engine here (no Megatron or "
                   "torch DDP); drop the flag"),
    "--squared-relu": (["--squared-relu"], "--squared-relu is not supported by this version yet; remove the flag"),
    "--apply-layernorm-1p": (["--apply-layernorm-1p"],
                             "--apply-layernorm-1p is not supported by this version yet; remove the flag"),
    "--warmup": (["--warmup", "10"], "--warmup is deprecated: use --lr-warmup-fraction or --lr-warmup-iters"),
    "--no-position-embedding": (["--no-position-embedding"],
                                "--no-position-embedding without --use-rotary-position-embeddings (a model without "
                                "position information) is not supported; add --use-rotary-position-embeddings or "
                                "drop the flag"),
}
REFUSED_DROP = {"--no-position-embedding": ["--use-rotary-position-embeddings"]}

# flag -> why it is accepted and does nothing (kernel / engine selection only; the math is the same)
_FUSION = ("upstream's switch for a fused CUDA kernel; this code has only the unfused path (the same math), "
           "so the switch has nothing to select")
_FLASH = ("attention always runs torch.nn.functional.scaled_dot_product_attention, which picks a flash kernel "
          "where the device has one; flash attention is exact attention, so the selected kernel changes no math")
NO_OP = {
    "--no-bias-gelu-fusion": _FUSION,
    "--no-bias-dropout-fusion": _FUSION,
    "--no-masked-softmax-fusion": _FUSION,
    "--no-gradient-accumulation-fusion": _FUSION,
    "--no-persist-layer-norm": _FUSION,
    "--use-flash-attn": _FLASH,
    "--use-flash-attn-v2": _FLASH,
    "--use-flash-attn-triton": _FLASH,
    "--use-flash-attn-builder": _FLASH,
    "--no-query-key-layer-scaling": "upstream's query-key layer scaling divides the scores by the layer number and "
                                    "multiplies it back in the fp32 softmax (the same math); here the scores are "
                                    "always scaled by 1/sqrt(head dim) only, which is what the flag selects",
    "--data-impl": "only the mmap .bin/.idx format exists here; 'infer' and 'mmap' read the same files the same way",
    "--deepspeed": "DeepSpeed is always the engine here; upstream needs the flag to select it",
    "--deepspeed_mpi": "ranks are always found from the MPI launcher's environment (PMI_*, OMPI_*, PALS_*), "
                       "which is what the flag asks DeepSpeed to do",
}

# launcher (and upstream Python-side) environment variables -> the test that shows their effect
ENV_EFFECT = {
    "ACT_CKPT_NUM_LAYERS": "test_launcher.py::test_env_var_sets_flag",
    "ADAM_BETA1": "test_launcher.py::test_env_var_sets_flag",
    "ADAM_BETA2": "test_launcher.py::test_env_var_sets_flag",
    "ADAM_EPS": "test_launcher.py::test_env_var_sets_flag",
    "ALCF_HOSTNAME": "test_launcher.py::test_pbs_aurora_launch",
    "ALCF_CPUINFO": "test_launcher.py::test_cpu_dtype_follows_native_bf16",
    "ALCF_TORCH_CPU_VERSION": "test_flag_audit.py::test_alcf_torch_cpu_version_pins_the_cpu_torch",
    "BE": "test_launcher.py::test_env_var_sets_flag",
    "CCL": "test_launcher.py::test_env_var_sets_flag",
    "CHECK_ARGS": "test_flag_audit.py::test_check_args_env_var",
    "CKPT_DIR": "test_launcher.py::test_env_var_sets_flag",
    "CLIP_GRAD": "test_launcher.py::test_env_var_sets_flag",
    "COMMS_LOGGER": "test_launcher.py::test_ds_config_options",
    "CPU_BIND": "test_launcher.py::test_pbs_polaris_and_cpu_bind",
    "CPU_OPTIMIZER": "test_launcher.py::test_ds_config_options",
    "DATA_FILE_LIST": "test_launcher.py::test_demo_mode",
    "DATA_PARENT": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "DEBUG": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "DEMO_DATA_DIR": "test_launcher.py::test_demo_respects_user_settings",
    "DEPTH_ALPHA": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "DEPTH_BASE": "test_launcher_mup.py::test_mup_base_width_and_depth_base",
    "DRY_RUN": "test_launcher.py::test_demo_mode",
    "DTYPE": "test_launcher.py::test_env_var_sets_flag",
    "EVAL_INTERVAL": "test_launcher.py::test_env_var_sets_flag",
    "EVAL_ITERS": "test_launcher.py::test_env_var_sets_flag",
    "EXEC": "test_launcher.py::test_invalid_settings",
    "FFN_HIDDEN_SIZE": "test_launcher.py::test_env_var_sets_flag",
    "FLOPS_PROFILER": "test_launcher.py::test_ds_config_options",
    "GLOBAL_BATCH": "test_launcher.py::test_env_var_sets_flag",
    "GPUS_PER_NODE": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "GRAD_ACC_STEPS": "test_launcher.py::test_env_var_sets_flag",
    "GRAD_ACCUM_DTYPE": "test_launcher.py::test_env_var_sets_flag",
    "HEADS": "test_launcher.py::test_env_var_sets_flag",
    "HIDDEN": "test_launcher.py::test_env_var_sets_flag",
    "HOSTFILE": "test_launcher.py::test_pbs_default_gpus_per_host_on_aurora",
    "INIT_METHOD_STD": "test_launcher.py::test_env_var_sets_flag",
    "LAUNCHER": "test_launcher.py::test_local_single_process_is_plain_python",
    "LAUNCH_WITH": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "LOAD": "test_launcher.py::test_env_var_sets_flag",
    "LOG_INTERVAL": "test_launcher.py::test_env_var_sets_flag",
    "LR": "test_launcher.py::test_env_var_sets_flag",
    "LR_DECAY_ITERS": "test_launcher.py::test_env_var_sets_flag",
    "LR_DECAY_STYLE": "test_launcher.py::test_env_var_sets_flag",
    "LR_WARMUP_FRAC": "test_launcher.py::test_env_var_sets_flag",
    "LR_WARMUP_FRACTION": "test_launcher.py::test_env_var_sets_flag",
    "MASTER_ADDR": "test_launcher.py::test_local_mpiexec",
    "MASTER_PORT": "test_launcher.py::test_local_torchrun",
    "MERGE_FILE": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "MICRO_BATCH": "test_launcher.py::test_env_var_sets_flag",
    "MIN_LR": "test_launcher.py::test_env_var_sets_flag",
    "MODEL_ARCH": "test_launcher.py::test_env_var_sets_flag",
    "MPIEXEC": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "MUP_BASE_WIDTH": "test_launcher_mup.py::test_mup_base_width_and_depth_base",
    "NCCL": "test_launcher.py::test_env_var_sets_flag",
    "NGPU_PER_HOST": "test_launcher.py::test_pbs_aurora_launch",
    "NHEADS": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "NLAYERS": "test_launcher.py::test_env_var_sets_flag",
    "NO_FLASH_ATTN": "test_launcher.py::test_env_var_removes_flag",
    "NO_LLAMA": "test_launcher.py::test_env_var_removes_flag",
    "NO_TENSORBOARD": "test_launcher.py::test_env_var_removes_flag",
    "NPROC": "test_launcher.py::test_env_var_sets_flag",
    "NUM_KV_HEAD": "test_launcher.py::test_env_var_sets_flag",
    "NUM_LAYERS": "test_launcher.py::test_env_var_sets_flag",
    "OMP_NUM_THREADS": "test_launcher.py::test_local_mpiexec",
    "OPT": "test_launcher.py::test_env_var_sets_flag",
    "OPTIM": "test_launcher.py::test_env_var_sets_flag",
    "OPTIMIZER": "test_launcher.py::test_env_var_sets_flag",
    "OVERRIDE_CKPT_OPT_PARAM": "test_launcher.py::test_env_var_removes_flag",
    "PBS_NODEFILE": "test_launcher.py::test_pbs_aurora_launch",
    "PBS_O_HOST": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "PBS_O_WORKDIR": "test_launcher.py::test_working_dir_from_pbs",
    "PP": "test_launcher.py::test_env_var_sets_flag",
    "ROPE_THETA": "test_launcher.py::test_env_var_sets_flag",
    "SAVE": "test_launcher.py::test_env_var_sets_flag",
    "SAVE_INTERVAL": "test_launcher.py::test_env_var_sets_flag",
    "SEQ": "test_launcher.py::test_env_var_sets_flag",
    "SEQ_LEN": "test_launcher.py::test_env_var_sets_flag",
    "SLURM_GPUS_ON_NODE": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "SLURM_JOB_ID": "test_launcher.py::test_slurm_job",
    "SLURM_JOB_NUM_NODES": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "SLURM_NNODES": "test_launcher.py::test_slurm_job",
    "SLURM_SUBMIT_DIR": "test_launcher.py::test_slurm_job",
    "SP": "test_launcher.py::test_env_var_sets_flag",
    "TEST_SPLIT": "test_launcher.py::test_env_var_sets_flag",
    "TIMING_LOG_LEVEL": "test_launcher.py::test_env_var_sets_flag",
    "TOKENIZER_MODEL": "test_launcher.py::test_env_var_sets_flag",
    "TOKENIZER_TYPE": "test_launcher.py::test_env_var_sets_flag",
    "TP": "test_launcher.py::test_env_var_sets_flag",
    "TRAIN_ITER": "test_launcher.py::test_env_var_sets_flag",
    "TRAIN_ITERS": "test_launcher.py::test_env_var_sets_flag",
    "TRAIN_SPLIT": "test_launcher.py::test_env_var_sets_flag",
    "TRAIN_TOKENS": "test_launcher.py::test_env_var_sets_flag",
    "USE_ACTIVATION_CHECKPOINTING": "test_launcher.py::test_env_var_sets_flag",
    "VAL_SPLIT": "test_launcher.py::test_env_var_sets_flag",
    "VENV_DIR": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "VOCAB_FILE": "test_flag_audit.py::test_launcher_env_vars_without_other_tests",
    "WEIGHT_DECAY": "test_launcher.py::test_env_var_sets_flag",
    "WORKING_DIR": "test_launcher.py::test_working_dir_from_pbs",
    "WORLD_SIZE": "test_launcher.py::test_pbs_world_size_env_overrides_count",
    "ZERO_HPZ_PARTITION_SIZE": "test_launcher.py::test_ds_config_options",
    "ZERO_STAGE": "test_launcher.py::test_env_var_sets_flag",
    "TORCH_PROFILER_ENABLE": "test_flag_audit.py::test_torch_profiler_enable",
    "WANDB_DISABLED": "test_training_log.py::test_wandb_disabled_env_var",
    "DUMP_TOKENS": "test_training_log.py::test_dump_tokens",
}
# name -> (value, the exact message); refused by the trainer's validation (`validate_args`)
ENV_REFUSED = {name: ("1", message) for name, message in REFUSED_ENV.items()}
# environment variables upstream's docs or Python side name (upstream-spec section 2.4), launcher or not
UPSTREAM_ENV = ("LAUNCH_WITH", "GPUS_PER_NODE", "TORCH_PROFILER_ENABLE", "DUMP_TOKENS", "DUMP_SKIPPED_ITERS",
                "PYINSTRUMENT_PROFILER", "WANDB_DISABLED")
# read with a default by the launcher, but not a user setting: name -> who sets it
NOT_SETTINGS = {
    "MACHINE": "the launcher (alcf_machine_name)",
    "ORIG_PWD": "the launcher (alcf_main, the directory it was started from)",
    "PYTHON": "ALCF/env.sh (setup_python_env exports the interpreter)",
    "VIRTUAL_ENV": "the activated Python environment",
    "CONDA_PREFIX": "the activated conda environment",
    "PYTHONPATH": "the Python environment (env.sh prepends the repository)",
    "TORCH_EXTENSIONS_DIR": "DeepSpeed/torch's own cache variable (env.sh only supplies a default)",
}
LAUNCHER_FILES = ("ALCF/helpers.sh", "train_alcf.sh", "ALCF/env.sh")


# ----------------------------------------------------------------------------- helpers
def parser_flags() -> dict[str, argparse.Action]:
    """Every action of the parser, by its first long option."""
    out = {}
    for a in build_parser()._actions:
        if a.dest == "help":
            continue
        out[next(o for o in a.option_strings if o.startswith("--"))] = a
    return out


def launcher_source() -> str:
    lines = []
    for f in LAUNCHER_FILES:
        with open(os.path.join(ROOT, f)) as fh:
            lines += [ln for ln in fh.read().splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


def launcher_settings() -> set[str]:
    src = launcher_source()
    names = set(re.findall(r"\$\{([A-Z][A-Z_0-9]*)(?::?[-+=])", src))
    names |= set(re.findall(r"_alcf_default ([A-Z][A-Z_0-9]*)", src))
    for a, b in re.findall(r"_alcf_alias ([A-Z][A-Z_0-9]*) ([A-Z][A-Z_0-9]*)", src):
        names |= {a, b}
    return names - set(NOT_SETTINGS)


def code_reading(dest: str, skip_arguments: bool) -> list[str]:
    """Files (megatron/, pretrain_gpt.py, tools/) whose code reads `args.<dest>` or "<dest>" (not add_argument)."""
    found = []
    for f in glob.glob(os.path.join(ROOT, "megatron", "**", "*.py"), recursive=True) + \
            glob.glob(os.path.join(ROOT, "tools", "**", "*.py"), recursive=True) + [os.path.join(ROOT, "pretrain_gpt.py")]:
        if skip_arguments and f.endswith(os.path.join("megatron", "arguments.py")):
            continue
        with open(f) as fh:
            text = "\n".join(ln for ln in fh.read().splitlines() if "add_argument(" not in ln)
        if re.search(r"(?:\.|[\"'])" + re.escape(dest) + r"\b", text):
            found.append(os.path.relpath(f, ROOT))
    return found


def check_test_reference(name: str, ref: str, mentions: tuple[str, ...]) -> list[str]:
    file, _, func = ref.partition("::")
    path = os.path.join(TESTS, file)
    if not os.path.isfile(path):
        return [f"{name}: {file} does not exist"]
    with open(path) as f:
        src = f.read()
    funcs = {n.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)}
    errs = [] if func in funcs else [f"{name}: no function {func} in {file}"]
    if not func.startswith("test_"):
        errs.append(f"{name}: {func} is not a test")
    if not any(re.search(re.escape(m) + r"(?![\w-])", src) for m in mentions):
        errs.append(f"{name}: {file} never names {' / '.join(mentions)}")
    return errs


# ----------------------------------------------------------------------------- the audit
def test_tables_do_not_overlap_and_name_only_real_flags():
    flags = parser_flags()
    keys = [*EFFECT, *REFUSED, *NO_OP]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert not set(keys) - set(flags), f"rows for flags the parser does not have: {sorted(set(keys) - set(flags))}"
    assert not set(ENV_EFFECT) & set(ENV_REFUSED)


def test_every_parser_flag_is_classified():
    missing = sorted(set(parser_flags()) - set(EFFECT) - set(REFUSED) - set(NO_OP))
    assert not missing, (f"flags accepted by megatron/arguments.py with no EFFECT / REFUSED / NO_OP row in "
                         f"tests/test_flag_audit.py (implement and test them, or refuse them): {missing}")


def test_effect_rows_name_a_test_and_the_code_reads_the_flag():
    flags = parser_flags()
    errs = []
    for flag, ref in EFFECT.items():
        a = flags[flag]
        errs += check_test_reference(flag, ref, (*a.option_strings, a.dest))
        if not code_reading(a.dest, skip_arguments=False):
            errs.append(f"{flag}: nothing reads args.{a.dest}")
    assert not errs, "\n".join(errs)


def test_no_op_flags_are_read_nowhere_and_explained():
    flags = parser_flags()
    assert len(NO_OP) <= 15, "keep the NO_OP table short: implement or refuse instead"
    for flag, why in NO_OP.items():
        assert len(why) > 40, flag
        assert code_reading(flags[flag].dest, skip_arguments=True) == [], flag


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_refused_flag_gives_its_message(flag):
    extra, message = REFUSED[flag]
    base = [t for t in BASE if t not in REFUSED_DROP.get(flag, [])]
    with pytest.raises(ArgumentError) as e:
        parse_args(base + extra, env={})
    assert message in str(e.value).splitlines()


def test_every_launcher_variable_is_classified():
    src = launcher_source()
    for name, who in NOT_SETTINGS.items():  # really set by the launcher or its environment, not a setting
        assert re.search(rf"(^|\s|export ){name}=", src) or "environment" in who, name
    names = launcher_settings() | set(UPSTREAM_ENV)
    missing = sorted(names - set(ENV_EFFECT) - set(ENV_REFUSED))
    assert not missing, (f"environment variables read by the launcher with no ENV_EFFECT / ENV_REFUSED row in "
                         f"tests/test_flag_audit.py: {missing}")
    assert not set(ENV_EFFECT) - names, sorted(set(ENV_EFFECT) - names)


def test_env_effect_rows_name_a_test():
    errs = []
    for name, ref in ENV_EFFECT.items():
        errs += check_test_reference(name, ref, (name,))
    assert not errs, "\n".join(errs)


@pytest.mark.parametrize("name", sorted(ENV_REFUSED))
def test_refused_env_var_gives_its_message(name):
    value, message = ENV_REFUSED[name]
    with pytest.raises(ArgumentError) as e:
        parse_args(BASE, env={name: value})
    assert message in str(e.value).splitlines()
    parse_args(BASE, env={name: "0"})  # unset / 0 is fine


def test_launch_with_deepspeed_is_refused_by_the_launcher(env):  # noqa: F811
    p = subprocess.run(["bash", str(SCRIPT)], env={**env, "DRY_RUN": "1", "LAUNCH_WITH": "deepspeed"}, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert ("ERROR: LAUNCH_WITH=deepspeed is not supported (the deepspeed launcher); use LAUNCH_WITH=MPICH (mpiexec) "
            "or LAUNCHER=torchrun") in p.stderr.splitlines()


# ----------------------------------------------------------------------------- effects tested nowhere else
def _args(*extra: str, env_vars: dict | None = None):
    return parse_args(BASE + list(extra), env=env_vars or {})


def test_use_checkpoint_args(tmp_path):
    """--use-checkpoint-args: the model-shape arguments come from the checkpoint --load resumes."""
    from megatron.checkpoint.checkpointing import ARGS_FILE, model_args_record, write_atomic

    saved = parse_args(TINY_MODEL + ["--lr", "1e-3", "--train-iters", "3", "--data-path", "x", "--num-layers", "3",
                                     "--hidden-size", "96", "--ffn-hidden-size", "256", "--seq-length", "48",
                                     "--max-position-embeddings", "96"], env={})
    tag = tmp_path / "global_step5"
    tag.mkdir()
    (tag / ARGS_FILE).write_text(json.dumps(model_args_record(Config.from_args(saved))))
    write_atomic(str(tmp_path / "latest"), "global_step5")
    args = _args("--load", str(tmp_path), "--use-checkpoint-args")
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.seq_length) == (3, 96, 256, 48)
    assert args.max_position_embeddings == 96 and args.checkpoint_args_used["num_layers"] == 3
    with pytest.raises(ArgumentError, match="num_layers: checkpoint 3 vs now 2"):  # without it: the command line's
        _args("--load", str(tmp_path))
    with pytest.raises(ArgumentError, match="--use-checkpoint-args needs --load"):
        _args("--use-checkpoint-args")
    with pytest.raises(ArgumentError, match="--use-checkpoint-args: no checkpoint with saved arguments"):
        _args("--load", str(tmp_path / "empty"), "--use-checkpoint-args")


def test_exit_duration_in_mins():
    from megatron.resilience.exits import ExitConditions

    args = _args("--exit-duration-in-mins", "0.5")
    exits = ExitConditions(Config.from_args(args).training)
    assert exits.reason(1) is None
    exits.start -= 31  # 31 s later
    assert exits.reason(2) == "exit-duration"
    assert ExitConditions(Config.from_args(_args()).training).reason(2) is None


def test_dshampoo_flags_reach_distributed_shampoo(monkeypatch):
    """The dshampooadamw flags are Distributed Shampoo's arguments (its package is faked: not installed here)."""
    from megatron.optimizer import build_optimizer

    got = {}
    fake = types.ModuleType("distributed_shampoo")
    fake.AdamGraftingConfig = lambda **kw: ("graft", kw)
    fake.DistributedShampoo = lambda groups, **kw: got.update(kw)
    monkeypatch.setitem(sys.modules, "distributed_shampoo", fake)
    args = _args("--zero-stage", "0", "--optimizer", "adamw", "--dshampooadamw-max-preconditioner-dim", "64",
                 "--dshampooadamw-precondition-freq", "7", "--dshampooadamw-use-decoupled-weight-decay", "false",
                 "--dshampooadamw-eps", "1e-9")
    args.optimizer = "dshampooadamw"
    build_optimizer(torch.nn.Linear(4, 4), Config.from_args(args))
    assert (got["max_preconditioner_dim"], got["precondition_frequency"], got["use_decoupled_weight_decay"],
            got["epsilon"]) == (64, 7, False, 1e-9)


def test_schedulefree_for_each():
    pytest.importorskip("schedulefree")  # a dependency of this package (setup.py)
    from megatron.optimizer import build_optimizer

    for flag, want in (((), False), (("--schedulefree-for-each",), True)):
        args = _args("--optimizer", "adamwschedulefree", "--zero-stage", "0", *flag)
        opt = build_optimizer(torch.nn.Linear(4, 4), Config.from_args(args))
        assert all(g["foreach"] is want for g in opt.param_groups)


@pytest.mark.parametrize("flag,value,base", [
    ("--lr-constant-fraction", "0.3", ["--lr-decay-style", "infinite-cosine", "--min-lr", "1e-5"]),
    ("--lr-cooldown-fraction", "0.2", ["--lr-decay-style", "infinite-cosine", "--min-lr", "1e-5"]),
    ("--lr-constant-tokens", "3000", ["--lr-decay-style", "infinite-cosine", "--min-lr", "1e-5",
                                      "--lr-decay-tokens", "12000"]),
    ("--lr-cooldown-tokens", "3000", ["--lr-decay-style", "infinite-cosine", "--min-lr", "1e-5",
                                      "--lr-decay-tokens", "12000"]),
    ("--lr-wsd-decay-samples", "200", ["--lr-decay-style", "wsd", "--lr-wsd-decay-iters", "1"]),
])
def test_schedule_flag_changes_the_lr_curve(flag, value, base):
    from megatron.schedules import build_schedule_spec, lr_at

    common = ["--train-iters", "100", "--global-batch-size", "4", *base]

    def curve(*extra):
        args = _args(*common, *extra)
        if flag == "--lr-wsd-decay-samples":  # --lr-wsd-decay-iters wins when both are given
            args.lr_wsd_decay_iters = None if extra else args.lr_wsd_decay_iters
        spec = build_schedule_spec(Config.from_args(args))
        return [lr_at(spec, s) for s in range(0, spec.end_steps + 1, max(spec.end_steps // 50, 1))]

    assert curve(flag, value) != pytest.approx(curve())


def test_lr_finder_beta(tmp_path):
    from megatron.lr_finder import build_lr_finder

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    args = _args("--lr-finder", "--lr-finder-beta", "0.5", "--save", str(tmp_path))
    args.rank = 1  # no output files
    finder = build_lr_finder(opt, Config.from_args(args))
    for it, loss in enumerate([4.0, 2.0, 3.0], 1):
        finder.step()  # DeepSpeed's scheduler step after the optimizer step, then the loss is recorded
        finder.record(it, loss)
    assert finder.smoothed == pytest.approx([4.0, 8 / 3, 20 / 7])  # bias-corrected EMA with beta 0.5, by hand


def test_trust_remote_code_reaches_autotokenizer(monkeypatch, tmp_path):
    import transformers

    from megatron.training import build_tokenizer_and_vocab

    seen = []

    class Tok:
        pad_token = eos_token = bos_token = unk_token = "x"
        eos_token_id, bos_token_id = 0, 1

        def __len__(self):
            return 100

    def fake(path, **kw):
        seen.append(kw.get("trust_remote_code"))
        return Tok()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    (tmp_path / "tokenizer.json").write_text("{}")
    for flags, want in (((), False), (("--trust-remote-code",), True)):
        args = parse_args([t for t in BASE if t not in ("NullTokenizer", "--vocab-size", "500")
                           and t != "--tokenizer-type"] + ["--tokenizer-type", "HFTokenizer", "--tokenizer-model",
                                                            str(tmp_path), *flags], env={})
        build_tokenizer_and_vocab(args)
        assert seen[-1] is want


def test_fp32_gradient_reduction_is_always_on():
    """Megatron's --accumulate-allreduce-grads-in-fp32 is the default here (--grad-accum-dtype fp32; 16-bit
    gradients only with --grad-accum-dtype bf16/fp16, tests/test_grad_accum_dtype.py): in 16-bit runs DeepSpeed
    averages the gradients in fp32 and (ZeRO >= 1) accumulates them in fp32, flag or not; 16-bit stage 0,
    whose DeepSpeed optimizer would add them up in 16 bits, is refused where it would add anything."""
    from megatron.training import build_ds_config

    for flags in (("--accumulate-allreduce-grads-in-fp32",), ()):
        args = _args("--bf16", "--zero-stage", "1", "--keep-zero-stage", *flags)
        args.rank = 0
        cfg = build_ds_config(Config.from_args(args))
        assert cfg["communication_data_type"] == "fp32" and cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    args = _args("--accumulate-allreduce-grads-in-fp32", "--zero-stage", "1")  # fp32: nothing to change
    args.rank = 0
    assert "communication_data_type" not in build_ds_config(Config.from_args(args))
    with pytest.raises(ArgumentError, match="DeepSpeed's stage 0 bf16 optimizer sums the gradients of micro-batches"):
        _args("--bf16", "--zero-stage", "0", "--global-batch-size", "4")
    _args("--bf16", "--zero-stage", "0")  # one replica, one micro-batch: nothing to add up


def test_cpu_optimizer_offloads():
    from megatron.training import build_ds_config

    args = _args("--cpu-optimizer", "--zero-stage", "2")
    args.rank = 0
    assert build_ds_config(Config.from_args(args))["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    args = _args("--zero-stage", "2")
    args.rank = 0
    assert "offload_optimizer" not in build_ds_config(Config.from_args(args))["zero_optimization"]
    with pytest.raises(ArgumentError, match="--cpu-optimizer offloads the optimizer with ZeRO"):
        _args("--cpu-optimizer", "--zero-stage", "0")


def test_torch_profiler_enable():
    """TORCH_PROFILER_ENABLE (upstream): 1 = the torch profiler (--profile pt) over the whole run, 2 = over
    --profile_steps; an explicit --profile wins; other values are refused."""
    args = _args(env_vars={"TORCH_PROFILER_ENABLE": "1"})
    assert (args.profile, args.profile_steps) == ("pt", "1,3")
    args = _args(env_vars={"TORCH_PROFILER_ENABLE": "2"})
    assert (args.profile, args.profile_steps) == ("pt", "2,3")
    assert _args("--profile", "pt-full", env_vars={"TORCH_PROFILER_ENABLE": "1"}).profile == "pt-full"
    assert _args(env_vars={"TORCH_PROFILER_ENABLE": "0"}).profile is None
    with pytest.raises(ArgumentError, match="TORCH_PROFILER_ENABLE='yes': use 1"):
        _args(env_vars={"TORCH_PROFILER_ENABLE": "yes"})


def _nodefile(tmp_path):
    return str(hostfile(tmp_path, 2, prefix="x3005c0s"))


LAUNCHER_CASES = {
    "NHEADS": ({"NHEADS": "8"}, lambda d: d.last("--num-attention-heads") == "8"),
    "GPUS_PER_NODE": ({"GPUS_PER_NODE": "3"}, lambda d: "world size 3 = 1 host(s) x 3 process(es)" in d.stdout),
    "LAUNCH_WITH": ({"LAUNCH_WITH": "MPICH", "NPROC": "2"}, lambda d: d.argv[0].endswith("mpiexec")),
    "DATA_PARENT": ({"TOKENIZER_TYPE": "GPT2BPETokenizer", "DATA_PARENT": "/dp"},
                    lambda d: (d.last("--vocab-file"), d.last("--merge-file")) == ("/dp/gpt2-vocab.json",
                                                                                   "/dp/gpt2-merges.txt")),
    "VOCAB_FILE": ({"TOKENIZER_TYPE": "GPT2BPETokenizer", "VOCAB_FILE": "/v.json"},
                   lambda d: d.last("--vocab-file") == "/v.json"),
    "MERGE_FILE": ({"TOKENIZER_TYPE": "GPT2BPETokenizer", "MERGE_FILE": "/m.txt"},
                   lambda d: d.last("--merge-file") == "/m.txt"),
    "DEBUG": ({"DEBUG": "1"}, lambda d: any(ln.startswith("+") for ln in d.stderr.splitlines())),
    "MPIEXEC": ({"MPIEXEC": "/opt/pals/bin/mpiexec", "PBS_NODEFILE": _nodefile},
                lambda d: d.argv[0] == "/opt/pals/bin/mpiexec"),
    "PBS_O_HOST": ({"ALCF_HOSTNAME": POLARIS_HOST, "PBS_O_HOST": "sirius-login-01", "PBS_NODEFILE": _nodefile},
                   lambda d: "# machine sirius" in d.stdout),
    "SLURM_JOB_NUM_NODES": ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"},
                            lambda d: "world size 8 = 2 host(s) x 4 process(es)" in d.stdout),
    "SLURM_GPUS_ON_NODE": ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "3"},
                           lambda d: "world size 3 = 1 host(s) x 3 process(es)" in d.stdout),
    "VENV_DIR": ({"VENV_DIR": "/opt/venvs/agpt"}, lambda d: "/opt/venvs/agpt/bin/python" in d.argv),
    "DEPTH_ALPHA": ({"DEPTH_BASE": "2", "DEPTH_ALPHA": "0.5"}, lambda d: d.last("--depth-alpha") == "0.5"),
}


@pytest.mark.parametrize("name", sorted(LAUNCHER_CASES))
def test_launcher_env_vars_without_other_tests(env, tmp_path, name):  # noqa: F811
    extra, check = LAUNCHER_CASES[name]
    extra = {k: v(tmp_path) if callable(v) else v for k, v in extra.items()}
    d = dry({**env, **extra})
    assert check(d), (name, d.stdout[-2000:], d.stderr[-2000:])
    without = dry({**env, **{k: v for k, v in extra.items() if k != name}}) if name not in ("SLURM_JOB_NUM_NODES",) \
        else None
    assert without is None or not check(without), name  # the variable, not the rest of the case, did it


def test_alcf_torch_cpu_version_pins_the_cpu_torch(tmp_path):
    """ALCF/env.sh installs the CPU build of torch ALCF_TORCH_CPU_VERSION when there is none (pip is faked)."""
    fake = tmp_path / "python"
    log = tmp_path / "pip-args"
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then exit 1; fi\n"
                    f"if [ \"$1\" = -m ] && [ \"$2\" = pip ]; then echo \"$@\" >> {log}; exit 0; fi\necho /x\n")
    fake.chmod(0o755)
    for version in ("9.8.7", None):
        log.write_text("")
        e = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **({"ALCF_TORCH_CPU_VERSION": version} if version else {})}
        p = subprocess.run(["bash", "-c", f"source {ROOT}/ALCF/env.sh && _alcf_pip_install {fake}"], env=e,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert f"torch=={version or '2.13.0'} " in log.read_text().splitlines()[0], log.read_text()


@pytest.mark.slow
def test_check_args_env_var(tmp_path):
    """CHECK_ARGS=1 (default): the launcher asks the trainer to check the command before writing anything;
    CHECK_ARGS=0 skips that and launches (here the trainer then refuses the same flag itself)."""
    data_list = make_dataset(str(tmp_path / "data"), n_docs=40)
    runs = {}
    for value in ("1", "0"):
        out = tmp_path / f"check{value}"
        out.mkdir()
        e = base_env(WORKING_DIR=str(out), DATA_FILE_LIST=data_list, MODEL_ARCH="tiny", TRAIN_ITERS="2",
                     TOKENIZER_TYPE="NullTokenizer", CHECK_ARGS=value, VIRTUAL_ENV=os.environ.get("VIRTUAL_ENV", ""),
                     PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        runs[value] = subprocess.run(["bash", str(SCRIPT), "--vocab-size", "500", "--mmap-warmup"], env=e, cwd=out,
                                     capture_output=True, text=True, timeout=300)
    checked, unchecked = runs["1"], runs["0"]
    assert checked.returncode == 2 and "the trainer refused the configuration" in checked.stderr
    assert not (tmp_path / "check1" / "logs").exists()  # refused before anything was written
    assert unchecked.returncode != 0 and "the trainer refused the configuration" not in unchecked.stderr
    assert (tmp_path / "check0" / "logs").exists()  # launched (and the trainer refused the flag)
    assert REFUSED_FLAGS["mmap_warmup"] in checked.stdout + checked.stderr
    assert REFUSED_FLAGS["mmap_warmup"] in unchecked.stdout + unchecked.stderr


@pytest.mark.slow
def test_skip_train_save_and_reset_flags(tmp_path):
    """--no-save-optim / --no-save-rng leave the optimizer state and the RNG state out of the checkpoint;
    --reset-iteration restarts the count (and data) from iteration 1 with the loaded weights; --skip-train
    only evaluates."""
    data_list = make_dataset(str(tmp_path / "data"), n_docs=80)

    def argv(out, *extra):
        return TINY_MODEL + ["--data-file-list", data_list, "--split", "90,10,0", "--data-cache-path",
                             str(tmp_path / "cache"), "--micro-batch-size", "4", "--global-batch-size", "4",
                             "--train-iters", "2", "--lr", "0.003", "--lr-decay-style", "constant", "--log-interval",
                             "1", "--eval-interval", "1000", "--eval-iters", "1", "--num-workers", "0",
                             "--zero-stage", "1", "--keep-zero-stage", "--deepspeed", "--seed", "1234",
                             "--peak-tflops", "1", "--metrics-file", str(out / "metrics.jsonl"), *extra]

    def records(out):
        with open(out / "metrics.jsonl") as f:
            return [r for r in map(json.loads, f) if "summary" not in r]

    ref, save = tmp_path / "ref", tmp_path / "ckpt"
    run_trainer(argv(ref, "--save", str(save), "--no-save-optim", "--no-save-rng"))
    tag = save / "global_step2"
    assert not [f for f in os.listdir(tag) if f.endswith("optim_states.pt")]
    client = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert "rng_state" not in client and "args" in client
    want = {r["iteration"]: r["lm_loss"] for r in records(ref) if "lm_loss" in r}

    reset = tmp_path / "reset"
    run_trainer(argv(reset, "--load", str(save), "--no-load-optim", "--reset-iteration"))
    got = {r["iteration"]: r for r in records(reset) if "lm_loss" in r}
    assert sorted(got) == [1, 2] and got[1]["consumed_samples"] == 4
    assert got[1]["lm_loss"] < want[1] - 0.01  # the same first batch, seen by the trained weights

    skip = tmp_path / "skip"
    run_trainer(argv(skip, "--load", str(save), "--no-load-optim", "--skip-train"))
    recs = records(skip)
    assert [r for r in recs if "lm_loss" in r] == [] and len([r for r in recs if "val_loss" in r]) == 1


def test_weight_stats_flags_where_they_cannot_count_right():
    """--log-num-zeros-in-grad is refused with PP > 1 (DeepSpeed's pipeline engine steps inside train_batch),
    --log-params-norm with PP > 1 and tied embeddings (two stages hold the embedding)."""
    pp = ["--pipeline-model-parallel-size", "2"]
    tied = [t for t in BASE if t != "--untie-embeddings-and-output-weights"]
    parse_args(BASE + pp + ["--log-params-norm"], env={"WORLD_SIZE": "2"})
    with pytest.raises(ArgumentError, match="--log-params-norm with pipeline parallelism needs "
                                            "--untie-embeddings-and-output-weights"):
        parse_args(tied + pp + ["--log-params-norm"], env={"WORLD_SIZE": "2"})
    with pytest.raises(ArgumentError, match="--log-num-zeros-in-grad is not supported with pipeline parallelism"):
        parse_args(BASE + pp + ["--log-num-zeros-in-grad"], env={"WORLD_SIZE": "2"})
