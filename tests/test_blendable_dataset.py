"""Corpus blending: greedy blend, per-file budgets, corpus grouping and ids."""
import math
import time

import numpy as np
import pytest

from megatron.data.blendable_dataset import (
    BlendableDataset, build_blending_indices, build_train_valid_test_datasets, file_budgets)
from megatron.data.data_list import DataSource
from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.data.helpers import blend_indices


def reference_blend(weights, size):
    """Port of Megatron's C++ build_blending_indices."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    taken = np.zeros(len(w), dtype=np.int64)
    di, si = [], []
    for i in range(size):
        x = max(i, 1.0)
        errors = w * x - taken
        d = int(np.argmax(errors))  # first maximum = lowest index on ties
        di.append(d)
        si.append(taken[d])
        taken[d] += 1
    return np.array(di), np.array(si)


@pytest.mark.parametrize("weights", [[1.0], [0.5, 0.5], [0.7, 0.2, 0.1], [1, 3, 3, 1, 0.25], [0.05, 0.95],
                                     list(np.random.default_rng(5).random(9)),
                                     list(np.random.default_rng(6).dirichlet(np.full(40, 0.5)))])  # > 32: wide scan
def test_greedy_blend_matches_reference_and_weights(weights):
    n = 3000
    di, si, drawn = build_blending_indices(weights, n)
    ref_d, ref_s = reference_blend(weights, n)
    np.testing.assert_array_equal(di, ref_d)
    np.testing.assert_array_equal(si, ref_s)
    np.testing.assert_array_equal(drawn, np.bincount(ref_d, minlength=len(weights)))
    if len(weights) > 1:  # the pure-Python fallback (no C compiler) gives the same blend
        w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        py_d, py_s, py_drawn = blend_indices(w, n, use_compiled=False)
        np.testing.assert_array_equal(py_d, ref_d)
        np.testing.assert_array_equal(py_s, ref_s)
        np.testing.assert_array_equal(py_drawn, drawn)
    w = np.asarray(weights) / np.sum(weights)
    counts = np.cumsum(np.eye(len(w), dtype=np.int64)[di], axis=0)  # counts[N-1, d] over the first N
    expected = np.arange(1, n + 1)[:, None] * w[None, :]
    assert np.abs(counts - np.round(expected)).max() <= 1  # within 1 sample of the target, for every N
    assert (counts - expected).max() <= 1.0  # never more than one sample ahead
    if len(w) <= 2:
        assert (expected - counts).max() < 1.0  # two datasets: never one sample behind either
    assert di.dtype == np.uint8 and si.dtype == np.int32


def test_greedy_blend_ties_and_speed():
    di, _, _ = build_blending_indices([1, 1, 1], 6)
    assert di.tolist() == [0, 1, 2, 0, 1, 2]  # ties go to the lowest index
    # step 0 uses max(i, 1), so the largest weight goes first; at i = 4 errors tie at 0 -> dataset 0
    di, _, _ = build_blending_indices([1, 3], 8)
    assert di.tolist() == [1, 0, 1, 1, 0, 1, 1, 1]
    start = time.time()
    di, si, drawn = build_blending_indices([0.6, 0.3, 0.1], 1_000_000)
    elapsed = time.time() - start
    assert np.bincount(di).tolist() == drawn.tolist() == [600000, 300000, 100000]
    assert si[-1] == np.bincount(di)[di[-1]] - 1
    assert elapsed < 5.0, f"1e6-sample blend took {elapsed:.1f} s"


def test_file_budgets():
    assert file_budgets([1, 2, 1], 100) == [26, 51, 26]  # ceil(25.125), ceil(50.25)
    assert file_budgets([0.2, 0.2], 1000) == [503, 503]  # ceil(502.5)
    assert file_budgets([3.0], 1000) == [1005]
    for n, ws in [(4096 * 1000, [0.3, 0.7]), (77, [1, 1, 1])]:
        assert file_budgets(ws, n) == [math.ceil(n * (w / sum(ws)) * 1.005) for w in ws]


def write_file(prefix, n_docs, file_id, rng):
    """Documents of 3-20 tokens; every token is file_id * 100000 + doc * 100 + position."""
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for d in range(n_docs):
        n = int(rng.integers(3, 20))
        b.add_document(file_id * 100000 + d * 100 + np.arange(n))
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


@pytest.fixture
def sources(tmp_path):
    rng = np.random.default_rng(0)
    return [DataSource(1.0, write_file(tmp_path / "f1", 200, 1, rng), "b_corpus"),
            DataSource(2.0, write_file(tmp_path / "f2", 300, 2, rng), "b_corpus"),
            DataSource(1.0, write_file(tmp_path / "f3", 200, 3, rng), "a_corpus"),
            DataSource(0.0, write_file(tmp_path / "f4", 10, 4, rng), "c_corpus")]  # zero weight: unused


def test_blended_train_valid_test(sources, tmp_path):
    train, valid, test = build_train_valid_test_datasets(sources, "90,10,0", (100, 10, 0), seq_length=8,
                                                         seed=1234, cache_dir=None, shuffle_sample_in_corpus=False)
    assert test is None
    assert train.corpus_names == ["a_corpus", "b_corpus"] and valid.corpus_names == ["a_corpus", "b_corpus"]
    # train budgets: ceil(100 * w * 1.005) with w = 1/4, 2/4, 1/4 -> f1 26, f2 51, f3 26
    assert train.corpus_sizes == [26, 26 + 51] and len(train) == 103
    assert valid.corpus_sizes == [3, 3 + 6] and len(valid) == 12  # ceil(2.5125), ceil(5.025)
    items = [train[i] for i in range(len(train))]
    ids = np.array([it["dataset_idx"] for it in items])
    assert np.bincount(ids).tolist() == [26, 77]
    counts = np.cumsum(ids == 0)
    assert np.abs(counts - np.arange(1, 104) * 26 / 103).max() <= 1
    for it in items:
        files = set((it["text"] // 100000).tolist())
        assert (files == {3}) if it["dataset_idx"] == 0 else (files <= {1, 2})
        assert it["text"].shape == (9,) and it["text"].dtype == np.int64
    # without shuffling, corpus b is file f1's first 26 samples then f2's first 51
    b = train.datasets[1]
    assert [b.locate(k) for k in (0, 25, 26, 76)] == [(0, 0), (0, 25), (1, 0), (1, 50)]
    np.testing.assert_array_equal(b[30]["text"], b.datasets[1][4]["text"])
    # valid samples only use the last 10% of documents of each file
    for i in range(len(valid)):
        text = valid[i]["text"]
        doc = (text % 100000) // 100
        file_id = text // 100000
        assert all((d >= 180) if f in (1, 3) else (d >= 270) for d, f in zip(doc, file_id))
    with pytest.raises(IndexError):
        train[103]


def test_shuffle_in_corpus_and_cache(sources, tmp_path):
    kw = dict(split="90,10,0", train_valid_test_num_samples=(100, 0, 0), seq_length=8, seed=99)
    plain, none_valid, _ = build_train_valid_test_datasets(sources, cache_dir=None,
                                                           shuffle_sample_in_corpus=False, **kw)
    assert none_valid is None
    cache = str(tmp_path / "cache")
    shuffled, _, _ = build_train_valid_test_datasets(sources, cache_dir=cache, shuffle_sample_in_corpus=True, **kw)
    perm = np.random.RandomState(99).permutation(77)
    corpus_b = shuffled.datasets[1]
    np.testing.assert_array_equal(corpus_b.perm, perm)
    for k in range(0, 77, 7):
        np.testing.assert_array_equal(corpus_b[k]["text"], plain.datasets[1][int(perm[k])]["text"])
    np.testing.assert_array_equal(shuffled.dataset_index, plain.dataset_index)  # blend itself is not shuffled
    again, _, _ = build_train_valid_test_datasets(sources, cache_dir=cache, shuffle_sample_in_corpus=True, **kw)
    for loaded in (again.dataset_index, again.datasets[1].perm):  # read-only views of the mapped cache entry
        assert not loaded.flags.writeable and not loaded.flags.owndata
    assert [again[i]["text"].tolist() for i in range(0, 103, 10)] == \
        [shuffled[i]["text"].tolist() for i in range(0, 103, 10)]


def test_files_without_split_documents_are_skipped(tmp_path):
    rng = np.random.default_rng(1)
    srcs = [DataSource(1.0, write_file(tmp_path / "big", 1000, 1, rng), "x"),
            DataSource(1.0, write_file(tmp_path / "small", 40, 2, rng), "y")]  # 1% of 40 docs rounds to 0
    train, valid, _ = build_train_valid_test_datasets(srcs, "990,10,0", (50, 20, 0), 4, 1, None)
    assert train.corpus_names == ["x", "y"] and train.corpus_sizes == [26, 26]
    assert valid.corpus_names == ["x"] and valid.corpus_sizes == [21]  # renormalized: ceil(20 * 1 * 1.005)
    only_small = [srcs[1]]
    _, valid, _ = build_train_valid_test_datasets(only_small, "990,10,0", (50, 20, 0), 4, 1, None)
    assert valid is None


def test_blendable_dataset_checks_sizes():
    with pytest.raises(RuntimeError, match="draws 7 samples from corpus b, which has 3"):
        BlendableDataset([list(range(10)), list(range(3))], [0.3, 0.7], 10, corpus_names=["a", "b"])


def test_blend_sample_in_corpus(sources, tmp_path):
    kw = dict(split="90,10,0", train_valid_test_num_samples=(100, 0, 0), seq_length=8, seed=7, cache_dir=None)
    blended, _, _ = build_train_valid_test_datasets(sources, shuffle_sample_in_corpus=False,
                                                    blend_sample_in_corpus=True, **kw)
    b = blended.datasets[1]  # corpus b: f1 (26 samples) and f2 (51), interleaved 26:51
    ref_d, ref_s = reference_blend([26, 51], 77)
    assert [b.locate(k) for k in range(77)] == list(zip(ref_d.tolist(), ref_s.tolist()))
    assert b.locate(0) == (1, 0) and b.locate(1) == (0, 0)
    plain, _, _ = build_train_valid_test_datasets(sources, shuffle_sample_in_corpus=False, **kw)
    for k in (0, 1, 40, 76):
        f, s = b.locate(k)
        np.testing.assert_array_equal(b[k]["text"], plain.datasets[1].datasets[f][s]["text"])
    assert blended.datasets[0].file_index is None  # a one-file corpus needs no blend
    shuffled, _, _ = build_train_valid_test_datasets(sources, shuffle_sample_in_corpus=True,
                                                     blend_sample_in_corpus=True, **kw)
    perm = np.random.RandomState(7).permutation(77)
    assert [shuffled.datasets[1].locate(k) for k in range(77)] == [b.locate(int(p)) for p in perm]


def test_index_building_is_spread_over_ranks(sources, tmp_path):
    """Two ranks (threads) with a barrier: every index is built exactly once, by its owner."""
    import threading
    cache = str(tmp_path / "cache")
    barrier = threading.Barrier(2)
    stats = [dict(), dict()]
    results = [None, None]
    order = []

    def run(rank):
        def wait():
            order.append((rank, "barrier"))
            barrier.wait(timeout=60)
        results[rank] = build_train_valid_test_datasets(
            sources, "90,10,0", (100, 10, 0), 8, 1234, cache, shuffle_sample_in_corpus=True,
            rank=rank, world_size=2, barrier=wait, stats=stats[rank])

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 6 file indices (3 files x 2 splits): 3 built per rank; rank 0 also builds 2 corpus permutations
    # x 2 splits + 2 blends and loads all 6 file indices; rank 1 then loads everything
    assert stats[0] == {"built": 3 + 4 + 2, "loaded": 6}
    assert stats[1] == {"built": 3, "loaded": 6 + 4 + 2}
    assert sorted(order) == [(0, "barrier")] * 2 + [(1, "barrier")] * 2
    for split in (0, 1):
        a, b = results[0][split], results[1][split]
        np.testing.assert_array_equal(a.dataset_index, b.dataset_index)
        assert [a[i]["text"].tolist() for i in range(len(a))] == [b[i]["text"].tolist() for i in range(len(b))]
    single, _, _ = build_train_valid_test_datasets(sources, "90,10,0", (100, 10, 0), 8, 1234, None)
    assert [single[i]["text"].tolist() for i in range(103)] == [results[1][0][i]["text"].tolist()
                                                                for i in range(103)]


def test_check_data_vocab(tmp_path):
    from megatron.data.blendable_dataset import check_data_vocab
    rng = np.random.default_rng(3)
    p32 = write_file(tmp_path / "wide", 50, 1, rng)  # int32 ids up to 1*100000 + 49*100 + 19
    expected = int(np.fromfile(p32 + ".bin", dtype="<i4").max())
    assert 104_900 < expected < 105_000
    assert check_data_vocab([p32], 200_000) == expected  # small file: the sample covers it all
    assert check_data_vocab([p32], 200_000, sample_bytes=None) == expected
    with pytest.raises(ValueError, match=r"wide\.bin: token id 1049\d\d >= the model's vocabulary size 32000"):
        check_data_vocab([p32], 32000)
    assert check_data_vocab([p32], 32000, rank=1, world_size=2) == -1  # rank 1 checks no file of 1
    b = IndexedDatasetBuilder(str(tmp_path / "u16.bin"), dtype=np.uint16)
    b.add_document([5, 65535])
    b.finalize(str(tmp_path / "u16.idx"))
    assert check_data_vocab([str(tmp_path / "u16")], 65536) == -1  # dtype range fits: not read
    with pytest.raises(ValueError, match="token id 65535"):
        check_data_vocab([str(tmp_path / "u16")], 50000)
