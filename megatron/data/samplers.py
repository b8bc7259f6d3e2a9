"""Megatron's sequential pretraining sampler (dataloader type ``single``)."""
from __future__ import annotations

from collections.abc import Iterator


class MegatronPretrainingSampler:
    """Batch sampler: micro-batches of sample indices for one data-parallel rank.

    Indices ``consumed_samples, consumed_samples + 1, ...`` are cut into blocks of
    ``micro_batch_size * data_parallel_size``; rank r takes the slice
    ``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of every block, so resuming at the
    restored ``consumed_samples`` continues exactly where training stopped. A last partial
    block is dropped when ``drop_last`` (the default); otherwise each rank gets its part of it
    (ranks whose part is empty get nothing).
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise ValueError(f"no sample to iterate: total_samples = {total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed_samples = {consumed_samples} is outside [0, total_samples = "
                             f"{total_samples}): the dataset is exhausted or the count is wrong")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        if data_parallel_size <= 0:
            raise ValueError(f"data_parallel_size must be > 0, got {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank = {data_parallel_rank} is outside [0, {data_parallel_size})")
        self.total_samples, self.consumed_samples = int(total_samples), int(consumed_samples)
        self.micro_batch_size, self.data_parallel_rank = int(micro_batch_size), int(data_parallel_rank)
        self.data_parallel_size, self.drop_last = int(data_parallel_size), drop_last
        self.block = self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Number of micro-batches this rank yields (upstream returns total_samples here)."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.block)
        if self.drop_last or rest <= self.data_parallel_rank * self.micro_batch_size:
            return full
        return full + 1

    def __iter__(self) -> Iterator[list[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        block_start = self.consumed_samples
        while block_start + self.block <= self.total_samples:
            yield list(range(block_start + start, block_start + start + self.micro_batch_size))
            block_start += self.block
        if not self.drop_last:
            last = list(range(block_start + start, min(block_start + start + self.micro_batch_size,
                                                       self.total_samples)))
            if last:
                yield last
