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

from megatron.config import Config, ModelConfig


def _default_ffn(model: ModelConfig) -> int | None:
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if model.hidden_size is None:
        return None
    return int(8 * model.hidden_size / 3 / 64) * 64 if model.swiglu else 4 * model.hidden_size


def parallel_problems(config: Config) -> list[str]:
    """One line per problem with the TP / sequence-parallel / recompute flags."""
    errs: list[str] = []
    tp, model, training = config.parallel.tensor_model_parallel_size, config.model, config.training
    if tp and tp > 1:
        heads, kv = model.num_attention_heads, model.num_key_value_heads or model.num_attention_heads
        if heads and heads % tp:
            errs.append(f"--num-attention-heads ({heads}) must be divisible by --tensor-model-parallel-size ({tp}); "
                        "change TP or HEADS")
        if kv and kv % tp:
            errs.append(f"--num-key-value-heads ({kv}) must be divisible by --tensor-model-parallel-size ({tp}) "
                        "(each TP rank holds whole KV groups); change TP or NUM_KV_HEAD")
        ffn = _default_ffn(model)
        if ffn and ffn % tp:
            errs.append(f"the FFN size ({ffn}) must be divisible by --tensor-model-parallel-size ({tp}); "
                        "change TP or FFN_HIDDEN_SIZE")
        if config.parallel.sequence_parallel and model.seq_length and model.seq_length % tp:
            errs.append(f"--sequence-parallel needs --seq-length ({model.seq_length}) divisible by "
                        f"--tensor-model-parallel-size ({tp})")
    if training.checkpoint_num_layers is not None and training.checkpoint_num_layers < 1:
        errs.append(f"--checkpoint-num-layers must be >= 1 (got {training.checkpoint_num_layers})")
    if training.checkpoint_activations and training.recompute_granularity == "selective":
        errs.append("--checkpoint-activations means --recompute-granularity full: give only one of "
                    "--checkpoint-activations and --recompute-granularity selective")
    return errs


def derived_parallel_fields(config: Config) -> dict:
    """Derived values, as {field: value} for the caller to set (`config.replace(**fields)`, or on the
    arguments before the Config is built): sequence parallelism off at TP = 1; recompute granularity
    and chunk size."""
    training, parallel = config.training, config.parallel
    granularity = training.recompute_granularity
    if training.checkpoint_activations or training.deepspeed_activation_checkpointing:
        granularity = granularity or "full"
    return {"sequence_parallel": False if parallel.tensor_model_parallel_size == 1 else parallel.sequence_parallel,
            "recompute_granularity": granularity, "recompute_num_layers": training.checkpoint_num_layers}
