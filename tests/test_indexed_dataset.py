"""MMIDIDX `.bin/.idx`: round trips, exact bytes against a hand-built index, zero-copy reads."""
import pickle
import struct

import numpy as np
import pytest
import torch

from megatron.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    MMapIndexedDataset,
    best_dtype,
)
from tools.mcore_venv import ensure_mcore_venv, isolated_env


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


def test_size_mismatch_and_sampled_max(tmp_path, caplog):
    write(tmp_path / "t", [np.arange(10), np.arange(5)], np.int32)
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-4])  # one token short
    with pytest.raises(ValueError, match=r"t\.bin: truncated \(56 bytes, its index .*t\.idx needs 60\)"):
        IndexedDataset(str(tmp_path / "t"))
    (tmp_path / "t.bin").write_bytes(data + b"\0" * 8)
    with caplog.at_level("WARNING"):
        assert IndexedDataset(str(tmp_path / "t")).get(1).tolist() == [0, 1, 2, 3, 4]
    assert "68 bytes, more than the 60" in caplog.text
    big = np.zeros(100_000, dtype=np.uint16)
    big[50_000] = 999  # between sampled windows
    big[99_999] = 7  # the last window is always read
    ds = write(tmp_path / "s", [big], np.uint16)
    assert ds.max_token_id(sample_bytes=None) == 999
    assert ds.max_token_id(sample_bytes=1024, windows=4) == 7


# ----------------------------------------------------------------------------- megatron-core cross-check
# Runs in the separate megatron-core venv (tools/mcore_venv.py): reads the files we wrote, writes
# its own from the same documents, and runs its C++ index helpers on inputs we give it.
MCORE_SCRIPT = r'''
import json, sys
import numpy as np, torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets import helpers_cpp
from megatron.core.datasets.helpers import build_sample_idx
work = sys.argv[1]
spec = json.load(open(work + "/spec.json"))
out = {}
for name, dtype in spec["dtypes"].items():
    ds = IndexedDataset(f"{work}/ours_{name}")
    out[name] = {"dtype": np.dtype(ds.index.dtype).name, "n": len(ds),
                 "docs": [ds[i].tolist() for i in range(len(ds))],
                 "get": ds.get(spec["get_index"], offset=2, length=3).tolist(),
                 "document_indices": ds.document_indices.tolist(),
                 "sequence_lengths": ds.sequence_lengths.tolist()}
    b = IndexedDatasetBuilder(f"{work}/theirs_{name}.bin", dtype=getattr(np, dtype))
    for doc in spec["docs"][name]:
        for seq in doc:
            b.add_item(torch.tensor(seq, dtype=torch.int64))
        b.end_document()
    b.finalize(f"{work}/theirs_{name}.idx")
s = spec["sample_idx"]
out["sample_idx"] = build_sample_idx(np.array(s["sizes"], np.int32), np.array(s["doc_idx"], np.int32),
                                     s["seq"], s["epochs"], s["tokens"]).tolist()
w = np.array(spec["blend"]["weights"], dtype=np.float64)
di = np.empty(spec["blend"]["size"], dtype=np.int16); si = np.empty(spec["blend"]["size"], dtype=np.int64)
helpers_cpp.build_blending_indices(di, si, w, len(w), spec["blend"]["size"], False)
out["blend"] = [di.tolist(), si.tolist()]
json.dump(out, open(work + "/out.json", "w"))
'''


@pytest.fixture(scope="module")
def mcore_python():
    try:
        return ensure_mcore_venv()
    except RuntimeError as e:  # no package index: cannot cross-check here
        pytest.skip(str(e))


@pytest.mark.slow
def test_cross_check_with_megatron_core(tmp_path, mcore_python):
    import json
    import subprocess

    from megatron.data.blendable_dataset import build_blending_indices
    from megatron.data.gpt_dataset import build_sample_idx

    rng = np.random.default_rng(11)
    # documents of 1-3 sequences (one has an empty sequence); ids span the dtype's range
    docs = [[rng.integers(0, 65535, size=int(rng.integers(0 if (d, k) == (2, 1) else 1, 30))).tolist()
             for k in range(int(rng.integers(1, 4)))] for d in range(25)]
    dtypes = {"u16": "uint16", "i32": "int32"}
    for name, dtype in dtypes.items():
        b = IndexedDatasetBuilder(str(tmp_path / f"ours_{name}.bin"), dtype=dtype)
        for doc in docs:
            for seq in doc:
                b.add_item(np.array(seq) * (3 if dtype == "int32" else 1))  # int32: ids above 65535
            b.end_document()
        b.finalize(str(tmp_path / f"ours_{name}.idx"))
    docs_i32 = [[[t * 3 for t in seq] for seq in doc] for doc in docs]
    sizes = rng.integers(0, 12, size=40).astype(np.int32)  # includes empty documents
    sizes[0] = 5
    doc_idx = np.tile(np.arange(40, dtype=np.int32), 3)
    np.random.RandomState(3).shuffle(doc_idx)
    tokens = int(sizes.sum())
    weights = (rng.random(7) + 0.01).tolist()
    weights = [w / sum(weights) for w in weights]
    get_index = next(i for i, seq in enumerate(seq for doc in docs for seq in doc) if len(seq) >= 5)
    spec = {"dtypes": dtypes, "docs": {"u16": docs, "i32": docs_i32}, "get_index": get_index,
            "sample_idx": {"sizes": sizes.tolist(), "doc_idx": doc_idx.tolist(), "seq": 7, "epochs": 3,
                           "tokens": tokens},
            "blend": {"weights": weights, "size": 5000}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "mcore_check.py").write_text(MCORE_SCRIPT)
    res = subprocess.run([mcore_python, str(tmp_path / "mcore_check.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=isolated_env())
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "out.json").read_text())
    flat = [seq for doc in docs for seq in doc]
    n_seq = len(flat)
    doc_starts = np.cumsum([0] + [len(doc) for doc in docs]).tolist()
    for name, dtype in dtypes.items():
        want = flat if dtype == "uint16" else [seq for doc in docs_i32 for seq in doc]
        got = out[name]  # megatron-core reading our files
        assert got["dtype"] == dtype and got["n"] == n_seq and got["docs"] == want
        assert got["document_indices"] == doc_starts and got["sequence_lengths"] == [len(s) for s in want]
        assert got["get"] == want[get_index][2:5]
        # files megatron-core wrote from the same documents: byte-identical, and we read them back
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"theirs_{name}{ext}").read_bytes() == (tmp_path / f"ours_{name}{ext}").read_bytes()
        theirs = IndexedDataset(str(tmp_path / f"theirs_{name}"))
        assert theirs.dtype == np.dtype(dtype) and [theirs[i].tolist() for i in range(n_seq)] == want
        assert theirs.doc_idx.tolist() == doc_starts
    # the index helpers: our compiled and numpy sample_idx and compiled blend against its C++ helpers
    for compiled in (True, False):
        assert build_sample_idx(sizes, doc_idx, 7, 3, tokens, use_compiled=compiled).tolist() == out["sample_idx"]
    di, si, _ = build_blending_indices(weights, 5000)
    assert di.tolist() == out["blend"][0] and si.tolist() == out["blend"][1]
