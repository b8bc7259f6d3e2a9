"""The datasets and loaders of a run: train/valid/test from the data list with upstream's sample
budgets, and the sampler-driven loader (resumable at any consumed-sample count)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron.config import Config
from megatron.core import parallel_state


def build_datasets(config: Config):
    """Train/valid/test datasets from the data list, with the upstream sample budgets."""
    from megatron.data.blendable_dataset import build_train_valid_test_datasets, check_data_vocab  # noqa: PLC0415
    from megatron.data.data_list import DataListError, DataSource, parse_data_file_list, validate_sources  # noqa: PLC0415

    data, training = config.data, config.training
    if data.data_file_list:
        sources = parse_data_file_list(data.data_file_list)
    else:  # --data-path: "prefix" or "w1 prefix1 w2 prefix2 ..."
        dp = data.data_path
        pairs = [(1.0, dp[0])] if len(dp) == 1 else [(float(dp[i]), dp[i + 1]) for i in range(0, len(dp), 2)]
        sources = [DataSource(w, p, os.path.basename(p)) for w, p in pairs]
    validate_sources(sources)
    gbs, iters, evals = training.global_batch_size, training.train_iters, training.eval_iters
    budgets = (iters * gbs,
               (iters // training.eval_interval + 1) * evals * gbs,
               evals * gbs)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    vocab = config.runtime.padded_vocab_size
    if vocab:  # each rank samples its share of the files
        try:  # also opens every .idx/.bin: a bad header or a token id >= vocab is one ERROR line
            check_data_vocab([s.prefix for s in sources], vocab, rank, world)
        except ValueError as e:
            raise DataListError(str(e)) from None
    return build_train_valid_test_datasets(
        sources, data.split, budgets, config.model.seq_length, config.model.seed, data.data_cache_path,
        shuffle_sample_in_corpus=data.shuffle_sample_in_corpus,
        blend_sample_in_corpus=data.blend_sample_in_corpus,
        rank=rank, world_size=world, barrier=dist.barrier if distributed else None)


def build_loader(dataset, config: Config, consumed_samples: int, dataloader_type: str = "single",
                 workers: bool = True):
    """Validation reads in order (the same samples every time); training as --dataloader-type says.

    `workers=False` reads in this process. Validation does: its few batches come from memory-mapped
    files, and forking --num-workers processes at every evaluation, from a process that by then runs
    other Python threads (TensorBoard's writer, W&B, the training loader's queue feeders), could leave
    a child deadlocked inside fork (CPython 3.11 re-initialising its thread states) and the run hung."""
    from megatron.data.samplers import build_sampler  # noqa: PLC0415

    if dataset is None:
        return None
    sampler = build_sampler(
        dataloader_type, total_samples=len(dataset), consumed_samples=consumed_samples,
        micro_batch_size=config.training.micro_batch_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size())
    # its own generator: starting an iterator draws a seed, which from the global RNG would shift
    # dropout and SophiaG's sampled labels after a resume (the iterator starts after the RNG is restored)
    num_workers = config.data.num_workers if workers else 0
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=False, persistent_workers=False,
                                       generator=torch.Generator().manual_seed(config.model.seed))
