"""MMIDIDX `.bin/.idx`: round trips, exact bytes against a hand-built index, zero-copy reads."""
import pickle
import struct

import numpy as np
import pytest
import torch

from megatron.data.indexed_dataset import (
    DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder, MMapIndexedDataset, best_dtype)


def write(prefix, docs, dtype):
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(d)
    b.finalize(str(prefix) + ".idx")
    return IndexedDataset(str(prefix))


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = np.dtype(DTYPE_CODES[code])
    rng = np.random.default_rng(code)
    docs = [rng.integers(0, 100, size=n).astype(dtype) for n in (5, 1, 0, 17, 3)]
    ds = write(tmp_path / "d", docs, dtype)
    assert ds.dtype == dtype and len(ds) == 5
    assert ds.sizes.dtype == np.int32 and ds.sizes.tolist() == [5, 1, 0, 17, 3]
    assert ds.doc_idx.tolist() == [0, 1, 2, 3, 4, 5] and ds.document_indices.dtype == np.int64
    assert ds.pointers.tolist() == [0, 5 * dtype.itemsize, 6 * dtype.itemsize, 6 * dtype.itemsize,
                                    23 * dtype.itemsize]
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
        assert ds[i].dtype == dtype
    with open(tmp_path / "d.idx", "rb") as f:
        assert f.read(18)[17] == code  # dtype byte after 9-byte magic and u64 version


def test_idx_bytes_match_hand_built_header(tmp_path):
    # two documents: [3 sequences] and [1 sequence], int32 tokens (code 4)
    b = IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.int32)
    b.add_item([1, 2, 3]); b.add_item(np.array([4])); b.add_item(torch.tensor([5, 6]))
    b.end_document()
    b.add_document([7, 8, 9, 10])
    b.finalize(str(tmp_path / "x.idx"))
    sizes, itemsize = [3, 1, 2, 4], 4
    pointers = [0, 12, 16, 24]
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4)
                + struct.pack("<Q", 4) + struct.pack("<Q", 3)
                + struct.pack("<4i", *sizes) + struct.pack("<4q", *pointers) + struct.pack("<3q", 0, 3, 4))
    assert (tmp_path / "x.idx").read_bytes() == expected
    assert (tmp_path / "x.bin").read_bytes() == struct.pack("<10i", *range(1, 11))
    assert sum(sizes) * itemsize == len((tmp_path / "x.bin").read_bytes())
    ds = MMapIndexedDataset(str(tmp_path / "x"))
    assert ds.doc_idx.tolist() == [0, 3, 4]


def test_get_is_zero_copy_with_offset_and_length(tmp_path):
    ds = write(tmp_path / "z", [np.arange(10), np.arange(100, 110)], np.uint16)
    part = ds.get(1, offset=2, length=5)
    assert part.tolist() == [102, 103, 104, 105, 106]
    assert ds.get(1, offset=7).tolist() == [107, 108, 109]
    assert ds.get(0, length=0).size == 0
    assert not part.flags.owndata and not part.flags.writeable  # a view on the mmap
    assert part.base is not None
    assert ds[-1].tolist() == list(range(100, 110))
    assert [a.tolist() for a in ds[0:2]] == [list(range(10)), list(range(100, 110))]
    with pytest.raises(IndexError):
        ds.get(0, offset=8, length=3)
    with pytest.raises(IndexError):
        ds.get(2)
    clone = pickle.loads(pickle.dumps(ds))  # for DataLoader workers started with spawn
    assert clone.get(1, offset=9).tolist() == [109]


def test_best_dtype_and_range_check(tmp_path):
    assert best_dtype(32000) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(128256) == np.int32
    b = IndexedDatasetBuilder(str(tmp_path / "r.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match="do not fit in uint16"):
        b.add_item([1, 70000])


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.idx"):
        IndexedDataset(str(tmp_path / "nothere"))
    write(tmp_path / "ok", [[1, 2]], np.uint16)
    (tmp_path / "bad.bin").write_bytes(b"")
    (tmp_path / "bad.idx").write_bytes(b"TNTIDX\x00\x00" + bytes(40))
    with pytest.raises(ValueError, match=r"bad\.idx: not an MMIDIDX"):
        IndexedDataset(str(tmp_path / "bad"))
    raw = bytearray((tmp_path / "ok.idx").read_bytes())
    raw[9:17] = struct.pack("<Q", 2)
    (tmp_path / "v2.idx").write_bytes(bytes(raw))
    (tmp_path / "v2.bin").write_bytes((tmp_path / "ok.bin").read_bytes())
    with pytest.raises(ValueError, match="v2.idx: unsupported MMIDIDX version 2"):
        IndexedDataset(str(tmp_path / "v2"))
    (tmp_path / "ok.idx").write_bytes((tmp_path / "ok.idx").read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated"):
        IndexedDataset(str(tmp_path / "ok"))
