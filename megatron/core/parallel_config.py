"""Checks and derived values of the tensor-parallel and activation-checkpointing flags
(called by `megatron.arguments`; kept here next to the code they configure).

* `--tensor-model-parallel-size t`: heads, KV heads and the FFN size must divide by t (each
  rank holds whole KV groups with their query heads, and a t-th of the gate and up halves);
  the vocabulary is padded to a multiple of `--make-vocab-size-divisible-by` x t.
* `--sequence-parallel`: needs TP > 1 to do anything (switched off at TP = 1, as upstream) and
  a sequence length divisible by t.
* `--checkpoint-activations` (or `--deepspeed-activation-checkpointing`, which upstream needs
  together with it) = `--recompute-granularity full` with `--checkpoint-num-layers` layers per
  checkpointed chunk; `--recompute-granularity selective` recomputes only the attention core.
"""
from __future__ import annotations

import argparse


def _default_ffn(args: argparse.Namespace) -> int | None:
    if args.ffn_hidden_size is not None:
        return args.ffn_hidden_size
    if args.hidden_size is None:
        return None
    return int(8 * args.hidden_size / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size


def parallel_problems(args: argparse.Namespace) -> list[str]:
    """One line per problem with the TP / sequence-parallel / recompute flags."""
    errs: list[str] = []
    tp = args.tensor_model_parallel_size
    if tp and tp > 1:
        heads, kv = args.num_attention_heads, args.num_key_value_heads or args.num_attention_heads
        if heads and heads % tp:
            errs.append(f"--num-attention-heads ({heads}) must be divisible by --tensor-model-parallel-size ({tp}); "
                        "change TP or HEADS")
        if kv and kv % tp:
            errs.append(f"--num-key-value-heads ({kv}) must be divisible by --tensor-model-parallel-size ({tp}) "
                        "(each TP rank holds whole KV groups); change TP or NUM_KV_HEAD")
        ffn = _default_ffn(args)
        if ffn and ffn % tp:
            errs.append(f"the FFN size ({ffn}) must be divisible by --tensor-model-parallel-size ({tp}); "
                        "change TP or FFN_HIDDEN_SIZE")
        if args.sequence_parallel and args.seq_length and args.seq_length % tp:
            errs.append(f"--sequence-parallel needs --seq-length ({args.seq_length}) divisible by "
                        f"--tensor-model-parallel-size ({tp})")
    if args.checkpoint_num_layers is not None and args.checkpoint_num_layers < 1:
        errs.append(f"--checkpoint-num-layers must be >= 1 (got {args.checkpoint_num_layers})")
    if args.checkpoint_activations and args.recompute_granularity == "selective":
        errs.append("--checkpoint-activations means --recompute-granularity full: give only one of "
                    "--checkpoint-activations and --recompute-granularity selective")
    return errs


def finalize_parallel_args(args: argparse.Namespace) -> None:
    """Derived values: sequence parallelism off at TP = 1; recompute granularity and chunk size."""
    if args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False
    if args.checkpoint_activations or args.deepspeed_activation_checkpointing:
        args.recompute_granularity = args.recompute_granularity or "full"
    args.recompute_num_layers = args.checkpoint_num_layers
