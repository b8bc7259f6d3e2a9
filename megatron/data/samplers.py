"""Megatron's pretraining batch samplers: ``single`` (sequential) and ``cyclic`` (random per epoch)."""
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


class MegatronPretrainingRandomSampler:
    """Batch sampler of dataloader type ``cyclic`` (upstream's random sampler with data sharding).

    An epoch is the ``(total_samples // (micro_batch_size * data_parallel_size)) * micro_batch_size``
    samples of each data-parallel rank's contiguous bucket (rank r owns ``[r * bucket, (r + 1) * bucket)``;
    the remainder is not used). Each epoch visits the bucket in the order of
    ``torch.randperm(bucket, generator seeded with the epoch number)`` (upstream's seed), in
    micro-batches; after the last one the next epoch starts with a new order, without end.
    ``consumed_samples`` counts all ranks' samples, so a resume continues the same stream.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int) -> None:
        self.block = micro_batch_size * data_parallel_size
        self.bucket = (total_samples // self.block) * micro_batch_size
        if self.bucket <= 0:
            raise ValueError(f"total_samples = {total_samples} is less than one global micro-batch ({self.block})")
        if consumed_samples < 0 or consumed_samples % self.block:
            raise ValueError(f"consumed_samples = {consumed_samples} is not a multiple of micro_batch_size x "
                             f"data_parallel_size = {self.block}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank = {data_parallel_rank} is outside [0, {data_parallel_size})")
        self.consumed_samples, self.micro_batch_size = int(consumed_samples), int(micro_batch_size)
        self.data_parallel_rank, self.data_parallel_size = int(data_parallel_rank), int(data_parallel_size)

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank."""
        return self.bucket // self.micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        import torch  # noqa: PLC0415

        epoch_samples = self.bucket * self.data_parallel_size
        consumed = self.consumed_samples
        start = self.data_parallel_rank * self.bucket
        while True:
            epoch, done = divmod(consumed, epoch_samples)
            order = torch.randperm(self.bucket, generator=torch.Generator().manual_seed(epoch)).tolist()
            for i in range(done // self.data_parallel_size, self.bucket, self.micro_batch_size):
                yield [start + j for j in order[i:i + self.micro_batch_size]]
                consumed += self.block


def build_sampler(dataloader_type: str, total_samples: int, consumed_samples: int, micro_batch_size: int,
                  data_parallel_rank: int, data_parallel_size: int):
    """The batch sampler `--dataloader-type` names: ``single`` (in order, once) or ``cyclic``."""
    cls = {"single": MegatronPretrainingSampler, "cyclic": MegatronPretrainingRandomSampler}[dataloader_type]
    return cls(total_samples=total_samples, consumed_samples=consumed_samples, micro_batch_size=micro_batch_size,
               data_parallel_rank=data_parallel_rank, data_parallel_size=data_parallel_size)
