"""Megatron-style tensor parallelism: parallel layers, vocab-parallel cross-entropy, the autograd
communication functions and the TP-aware RNG tracker. See each module's docstring."""
from megatron.core.parallel_state import get_tensor_model_parallel_rank as rank
from megatron.core.parallel_state import (
    get_tensor_model_parallel_world_size as world_size,
)
from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_shape,
    gather_full,
    init_partitioned,
    is_partitioned,
    parallel_lm_logits,
    register_sequence_parallel_grad_hooks,
    shard,
    unshard,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.random import (
    RNGStatesTracker,
    checkpoint,
    get_rng_tracker,
    model_parallel_manual_seed,
    model_parallel_rng,
)

__all__ = [
    "ColumnParallelLinear",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "checkpoint",
    "copy_to_tensor_model_parallel_region",
    "full_shape",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "gather_full",
    "get_rng_tracker",
    "init_partitioned",
    "is_partitioned",
    "model_parallel_manual_seed",
    "model_parallel_rng",
    "parallel_lm_logits",
    "rank",
    "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "register_sequence_parallel_grad_hooks",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "shard",
    "unshard",
    "vocab_parallel_cross_entropy",
    "world_size",
]
