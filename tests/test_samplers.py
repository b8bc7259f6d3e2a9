"""Batch samplers: MegatronPretrainingSampler (block walk, DP slices, resume, drop_last) and the cyclic one."""
import pytest
import torch

from megatron.data.samplers import MegatronPretrainingSampler


def batches(total, consumed, micro, rank, dp, drop_last=True):
    return list(MegatronPretrainingSampler(total, consumed, micro, rank, dp, drop_last))


def test_dp_slices_of_each_block():
    # blocks of micro * dp = 2 * 3 = 6: [0..5], [6..11], [12..17]; 20 samples -> 2 left over, dropped
    assert batches(20, 0, 2, 0, 3) == [[0, 1], [6, 7], [12, 13]]
    assert batches(20, 0, 2, 1, 3) == [[2, 3], [8, 9], [14, 15]]
    assert batches(20, 0, 2, 2, 3) == [[4, 5], [10, 11], [16, 17]]
    seen = sorted(i for r in range(3) for b in batches(20, 0, 2, r, 3) for i in b)
    assert seen == list(range(18))
    assert len(MegatronPretrainingSampler(20, 0, 2, 0, 3)) == 3


def test_resume_from_consumed_samples():
    full = batches(100, 0, 4, 1, 2)          # blocks of 8
    resumed = batches(100, 24, 4, 1, 2)      # 3 blocks consumed
    assert resumed == full[3:] and resumed[0] == [28, 29, 30, 31]
    assert batches(100, 5, 4, 0, 2)[0] == [5, 6, 7, 8]  # mid-block consumed counts shift the walk


def test_no_drop_last():
    assert batches(20, 0, 2, 0, 3, drop_last=False)[-1] == [18, 19]
    assert batches(20, 0, 2, 1, 3, drop_last=False) == [[2, 3], [8, 9], [14, 15]]  # nothing left for rank 1
    s = MegatronPretrainingSampler(21, 0, 2, 1, 3, drop_last=False)
    assert list(s)[-1] == [20] and len(s) == 4


def test_works_as_dataloader_batch_sampler():
    ds = list(range(100, 150))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=MegatronPretrainingSampler(50, 10, 4, 1, 2))
    got = [b.tolist() for b in loader]
    assert got[0] == [114, 115, 116, 117] and len(got) == len(loader) == 5


@pytest.mark.parametrize("args, message", [
    ((0, 0, 1, 0, 1), "total_samples"),
    ((10, 10, 1, 0, 1), "consumed_samples = 10"),
    ((10, -1, 1, 0, 1), "consumed_samples = -1"),
    ((10, 0, 0, 0, 1), "micro_batch_size"),
    ((10, 0, 1, 0, 0), "data_parallel_size"),
    ((10, 0, 1, 2, 2), "data_parallel_rank = 2"),
])
def test_argument_errors(args, message):
    with pytest.raises(ValueError, match=message):
        MegatronPretrainingSampler(*args)


# ----------------------------------------------------------------------------- --dataloader-type cyclic
def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_cyclic_epochs_are_seeded_permutations_of_each_rank_bucket():
    import torch

    from megatron.data.samplers import build_sampler

    total, mb, dp = 23, 2, 2  # block 4 -> 5 blocks: bucket of 10 per rank, 3 samples unused
    for rank in range(dp):
        s = build_sampler("cyclic", total, 0, mb, rank, dp)
        assert len(s) == 5
        batches = _take(s, 15)  # three epochs
        assert all(len(b) == mb for b in batches)
        for epoch in range(3):
            seen = [i for b in batches[5 * epoch:5 * epoch + 5] for i in b]
            # upstream's order: randperm(bucket) with a generator seeded by the epoch, offset by the rank's bucket
            want = [10 * rank + j for j in torch.randperm(10, generator=torch.Generator().manual_seed(epoch)).tolist()]
            assert seen == want, (rank, epoch)
        first, second = ([i for b in batches[k:k + 5] for i in b] for k in (0, 5))
        assert first != second and sorted(first) == sorted(second) == list(range(10 * rank, 10 * rank + 10))


def test_cyclic_resume_continues_the_same_stream_and_differs_from_single():
    from megatron.data.samplers import build_sampler

    full = _take(build_sampler("cyclic", 40, 0, 2, 1, 2), 14)  # 10 per epoch for this rank
    for done in (4, 20, 36):  # mid-epoch, epoch boundary, in the second epoch (consumed counts both ranks)
        assert _take(build_sampler("cyclic", 40, done, 2, 1, 2), 14 - done // 4) == full[done // 4:]
    single = [b for b in build_sampler("single", 40, 0, 2, 1, 2)]
    assert full[:10] != single and sorted(i for b in full[:10] for i in b) != sorted(i for b in single for i in b)
    with pytest.raises(ValueError, match="not a multiple"):
        build_sampler("cyclic", 40, 3, 2, 0, 2)
