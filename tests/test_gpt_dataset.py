"""GPTDataset index semantics (Megatron's doc_idx / sample_idx / shuffle_idx) against naive references."""
import os

import numpy as np
import pytest

from megatron.data.gpt_dataset import (
    GPTDataset, build_doc_idx, build_sample_idx, build_shuffle_idx, get_split_bounds, num_epochs_needed)
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def make_dataset(prefix, sizes, seed=0):
    """Documents with distinct tokens: document d holds d*1000 + 0, 1, 2, ..."""
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for d, n in enumerate(sizes):
        b.add_document(np.arange(n, dtype=np.int32) + d * 1000)
    b.finalize(str(prefix) + ".idx")
    return IndexedDataset(str(prefix))


def reference_sample_idx(sizes, doc_idx, seq, epochs, tokens):
    """Line-by-line port of Megatron's C++ build_sample_idx loop."""
    n = (epochs * tokens - 1) // seq
    out, di, off = [(0, 0)], 0, 0
    for _ in range(n):
        remaining = seq + 1
        while remaining != 0:
            length = sizes[doc_idx[di]] - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - 1
                remaining = 0
            else:
                di, off = di + 1, 0
        out.append((di, off))
    return np.array(out)


@pytest.mark.parametrize("split, n, expected", [
    ("990,10,0", 1000, [0, 990, 1000, 1000]),
    ("969, 30, 1", 1000, [0, 969, 999, 1000]),
    ("990,10,0", 7, [0, 7, 7, 7]),            # 0.07 docs of valid rounds to 0
    ("1/1/1", 10, [0, 4, 7, 10]),             # 3+3+3 = 9, every boundary shifted by 1
    ("1,1", 5, [0, 3, 5, 5]),                 # round(2.5) = 2 twice (banker's rounding), then shifted
    ("100", 42, [0, 42, 42, 42]),
])
def test_split_bounds(split, n, expected):
    assert get_split_bounds(split, n) == expected


@pytest.mark.parametrize("bad", ["a,b,c", "0,0,0", "-1,2,0", "98,1,1,0", "nan,1,0", "", "99;1"])
def test_split_bounds_errors(bad):
    with pytest.raises(ValueError, match="invalid --split"):
        get_split_bounds(bad, 10)


def test_num_epochs_rule():
    for tokens, seq, n in [(100, 10, 9), (100, 10, 10), (100, 10, 0), (7, 5, 30), (4096, 4096, 1), (4097, 4096, 1)]:
        e = 1
        while (e * tokens - 1) // seq < n:  # upstream's loop
            e += 1
        assert num_epochs_needed(tokens, seq, n) == e
    assert num_epochs_needed(100, 10, 9) == 1 and num_epochs_needed(100, 10, 10) == 2


@pytest.mark.parametrize("compiled", [True, False])
def test_sample_idx_matches_cpp_loop(compiled):
    rng = np.random.default_rng(3)
    sizes = rng.integers(0, 40, size=60).astype(np.int32)
    sizes[[0, 5, 6]] = 0  # empty documents, including the first one
    documents = np.arange(60)
    for seq in (1, 7, 16, 100):
        for epochs in (1, 3):
            doc_idx = build_doc_idx(documents, epochs, np.random.RandomState(seq), False)
            tokens = int(sizes.sum())
            got = build_sample_idx(sizes, doc_idx, seq, epochs, tokens, use_compiled=compiled)
            want = reference_sample_idx(sizes, doc_idx, seq, epochs, tokens)
            np.testing.assert_array_equal(got, want)
            assert got.shape == ((epochs * tokens - 1) // seq + 1, 2)


def test_doc_and_shuffle_idx_use_upstream_rng_order():
    docs = np.arange(3, 9)
    rng = np.random.RandomState(1234)
    doc_idx = build_doc_idx(docs, 2, rng, False)
    ref_rng = np.random.RandomState(1234)
    ref = np.tile(docs, 2).astype(np.int32)
    ref_rng.shuffle(ref)
    np.testing.assert_array_equal(doc_idx, ref)
    assert doc_idx.dtype == np.int32
    shuffle = build_shuffle_idx(5, 8, rng)
    assert shuffle.dtype == np.uint32
    assert sorted(shuffle[:5]) == [0, 1, 2, 3, 4] and sorted(shuffle[5:]) == [5, 6, 7]


def naive_samples(ds, indexed):
    """Every sample by slicing the concatenated token stream of ds.doc_idx."""
    stream = np.concatenate([indexed[int(d)] for d in ds.doc_idx]).astype(np.int64)
    seq = ds.seq_length
    return [stream[int(j) * seq: int(j) * seq + seq + 1] for j in ds.shuffle_idx]


def test_samples_equal_naive_concatenation(tmp_path):
    sizes = [5, 0, 13, 2, 30, 1, 9, 4]
    indexed = make_dataset(tmp_path / "d", sizes)
    docs = np.array([0, 1, 2, 3, 4, 5, 6])  # doc 7 belongs to another split
    ds = GPTDataset("train", indexed, docs, num_samples=20, seq_length=8, seed=7, cache_dir=None)
    tokens = sum(sizes[:7])  # 60
    assert ds.tokens_per_epoch == tokens and ds.num_epochs == 3  # (3*60-1)//8 = 22 >= 20 > (2*60-1)//8 = 14
    assert len(ds) == (3 * tokens - 1) // 8 == 22
    assert sorted(ds.doc_idx.tolist()) == sorted(list(range(7)) * 3)
    expected = naive_samples(ds, indexed)
    for i in range(len(ds)):
        text = ds[i]["text"]
        assert text.dtype == np.int64 and text.shape == (9,)
        np.testing.assert_array_equal(text, expected[i])
    assert 7000 not in np.concatenate([ds[i]["text"] for i in range(len(ds))])
    # consecutive samples (before shuffling) overlap by exactly one token
    pos = {int(j): i for i, j in enumerate(ds.shuffle_idx)}
    for j in range(len(ds) - 1):
        assert ds[pos[j]]["text"][-1] == ds[pos[j + 1]]["text"][0]


def test_separate_last_epoch_rule(tmp_path):
    indexed = make_dataset(tmp_path / "e", [10] * 10)  # 100 tokens: 9 samples of 10 per epoch
    # 10 samples: 2 epochs, the last supplies 1 < int(0.8*9) = 7 -> shuffled separately
    ds = GPTDataset("train", indexed, np.arange(10), 10, 10, 3, None)
    assert ds.num_epochs == 2 and len(ds) == 19
    assert sorted(ds.doc_idx[:10]) == list(range(10)) and sorted(ds.doc_idx[10:]) == list(range(10))
    assert sorted(ds.shuffle_idx[:9]) == list(range(9)) and sorted(ds.shuffle_idx[9:]) == list(range(9, 19))
    # 16 samples: the last epoch supplies 7 >= 7 -> one shuffle over both epochs
    ds = GPTDataset("train", indexed, np.arange(10), 16, 10, 3, None)
    rng = np.random.RandomState(3)
    ref = np.tile(np.arange(10, dtype=np.int32), 2)
    rng.shuffle(ref)
    np.testing.assert_array_equal(ds.doc_idx, ref)
    ref_shuffle = np.arange(19, dtype=np.uint32)
    rng.shuffle(ref_shuffle)
    np.testing.assert_array_equal(ds.shuffle_idx, ref_shuffle)


def test_determinism_and_cache_reuse(tmp_path):
    rng = np.random.default_rng(0)
    indexed = make_dataset(tmp_path / "c", rng.integers(1, 50, size=40))
    docs = np.arange(35)
    a = GPTDataset("train", indexed, docs, 50, 16, 1234, None)
    b = GPTDataset("train", indexed, docs, 50, 16, 1234, None)
    other = GPTDataset("train", indexed, docs, 50, 16, 1235, None)
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.shuffle_idx, other.shuffle_idx)

    cache = tmp_path / "cache"
    first = GPTDataset("train", indexed, docs, 50, 16, 1234, str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 1 and files[0].endswith(".idxc")  # one entry: doc_idx, sample_idx, shuffle_idx
    umask = os.umask(0)
    os.umask(umask)
    # a shared data cache: permissions follow the umask (mkstemp would make them 0600)
    assert os.stat(cache / files[0]).st_mode & 0o777 == 0o666 & ~umask
    mtimes = {f: os.stat(cache / f).st_mtime_ns for f in files}
    second = GPTDataset("train", indexed, docs, 50, 16, 1234, str(cache))
    assert not second.sample_idx.flags.writeable and not second.sample_idx.flags.owndata  # a view of the map
    assert {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache)} == mtimes
    for name in ("doc_idx", "sample_idx", "shuffle_idx"):
        np.testing.assert_array_equal(getattr(first, name), getattr(a, name))
        np.testing.assert_array_equal(getattr(second, name), getattr(a, name))
        assert getattr(second, name).dtype == getattr(a, name).dtype
    assert [second[i]["text"].tolist() for i in range(5)] == [a[i]["text"].tolist() for i in range(5)]
    # another split / sample count gets its own entry
    GPTDataset("valid", indexed, np.arange(35, 40), 10, 16, 1234, str(cache))
    assert len(os.listdir(cache)) == 2


def test_errors(tmp_path):
    indexed = make_dataset(tmp_path / "x", [0, 0, 3])
    with pytest.raises(ValueError, match="no documents"):
        GPTDataset("valid", indexed, np.arange(0), 10, 4, 1, None)
    with pytest.raises(ValueError, match="no tokens"):
        GPTDataset("valid", indexed, np.arange(2), 10, 4, 1, None)
    with pytest.raises(IndexError):
        GPTDataset("train", indexed, np.arange(3), 1, 2, 1, None)[5]


def test_interrupted_cache_write_leaves_no_file(tmp_path, monkeypatch):
    import megatron.data.index_cache as ic

    indexed = make_dataset(tmp_path / "i", [7] * 20)
    cache = tmp_path / "cache"
    real_tofile = np.ndarray.tofile

    class Interrupt(KeyboardInterrupt):
        pass

    def failing_write(path, description, arrays):
        def write(f):
            f.write(ic.MAGIC + b"partial")
            raise Interrupt
        ic._atomic_write(path, write)

    monkeypatch.setattr(ic, "write_entry", failing_write)
    with pytest.raises(Interrupt):
        GPTDataset("train", indexed, np.arange(20), 30, 8, 5, str(cache))
    assert os.listdir(cache) == []  # neither a partial entry nor a temporary file
    monkeypatch.undo()
    assert np.ndarray.tofile is real_tofile
    ds = GPTDataset("train", indexed, np.arange(20), 30, 8, 5, str(cache))
    assert len(os.listdir(cache)) == 1 and len(ds) == (20 * 7 * 2 - 1) // 8


def test_cache_entry_round_trip_and_damage(tmp_path):
    from megatron.data.index_cache import cached_index_arrays, read_entry, write_entry

    arrays = {"a": np.arange(10, dtype=np.int32), "b": np.arange(12, dtype=np.int64).reshape(6, 2),
              "empty": np.zeros(0, dtype=np.uint8), "c": np.array([3], dtype=np.uint8)}
    path = str(tmp_path / "x.idxc")
    write_entry(path, "desc\nwith lines", arrays)
    desc, got = read_entry(path)
    assert desc == "desc\nwith lines" and list(got) == list(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v)
        assert got[k].ctypes.data % 8 == 0 or got[k].size == 0  # aligned views
    with open(path, "r+b") as f:  # truncate the last array: the entry is refused, then rebuilt
        f.truncate(os.path.getsize(path) - 70)
    with pytest.raises(ValueError, match="truncated"):
        read_entry(path)
    calls = []

    def build():
        calls.append(1)
        return {"v": np.arange(5)}

    stats: dict = {}
    for _ in range(2):
        out = cached_index_arrays(str(tmp_path / "c"), "d", ("v",), build, stats)
        assert out["v"].tolist() == [0, 1, 2, 3, 4]
    assert stats == {"built": 1, "loaded": 1} and len(calls) == 1
    entry = next(p for p in (tmp_path / "c").iterdir())
    entry.write_bytes(b"garbage")
    cached_index_arrays(str(tmp_path / "c"), "d", ("v",), build, stats)
    assert stats == {"built": 2, "loaded": 1}


def _build_in_child(args):
    prefix, cache = args
    ds = GPTDataset("train", IndexedDataset(prefix), np.arange(300), 2000, 16, 11, cache)
    return ds.shuffle_idx.sum(dtype=np.int64), ds[17]["text"].tolist()


def test_concurrent_builders_agree(tmp_path):
    import multiprocessing

    rng = np.random.default_rng(2)
    make_dataset(tmp_path / "p", rng.integers(1, 60, size=300))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.map(_build_in_child, [(str(tmp_path / "p"), str(tmp_path / "cache"))] * 4)
    assert all(r == results[0] for r in results)
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and not [f for f in files if f.endswith(".tmp")]
    assert _build_in_child((str(tmp_path / "p"), str(tmp_path / "cache"))) == results[0]


def test_reset_position_ids_after_eod():
    import torch

    from megatron.data.gpt_dataset import reset_position_ids
    eod = 9
    tokens = torch.tensor([[5, 6, 9, 7, 8, 9, 9, 1],
                           [1, 2, 3, 4, 5, 6, 7, 8],
                           [9, 1, 2, 3, 9, 4, 5, 6]])
    expected = [[0, 1, 2, 0, 1, 2, 0, 0],  # the EOD keeps its document's numbering
                [0, 1, 2, 3, 4, 5, 6, 7],
                [0, 0, 1, 2, 3, 0, 1, 2]]
    assert reset_position_ids(tokens, eod).tolist() == expected
    # upstream's loop (get_ltor_masks_and_position_ids), written out
    ref = torch.arange(8).repeat(3, 1)
    for b in range(3):
        prev = 0
        for i in (tokens[b] == eod).nonzero().flatten().tolist():
            ref[b, i + 1:] -= i + 1 - prev
            prev = i + 1
    assert ref.tolist() == expected


def test_document_attention_mask_matches_upstream_loop():
    import torch

    from megatron.data.gpt_dataset import document_attention_mask
    eod = 9
    tokens = torch.tensor([[5, 6, 9, 7, 8, 9, 9, 1],
                           [1, 2, 3, 4, 5, 6, 7, 8],
                           [9, 1, 2, 3, 9, 4, 5, 6]])
    got = document_attention_mask(tokens, eod)
    assert got.shape == (3, 1, 8, 8) and got.dtype == torch.bool
    # upstream's loop (get_ltor_masks_and_position_ids with reset_attention_mask), written out:
    # lower-triangular, then for every EOD at i: rows after i may not see columns up to i
    ref = torch.tril(torch.ones(3, 1, 8, 8, dtype=torch.bool))
    for b in range(3):
        for i in (tokens[b] == eod).nonzero().flatten().tolist():
            ref[b, 0, i + 1:, :i + 1] = False
    assert torch.equal(got, ref)
    assert torch.equal(got[1, 0], torch.tril(torch.ones(8, 8, dtype=torch.bool)))  # no EOD: plain causal

