"""Megatron's memory-mapped indexed dataset: the "MMIDIDX" `.bin/.idx` pair.

`<prefix>.bin` holds the token arrays of all sequences back to back. `<prefix>.idx` is
little-endian::

    b"MMIDIDX\\x00\\x00"   magic (9 bytes)
    u64  version (= 1)
    u8   dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16)
    u64  number of sequences S
    u64  number of document-index entries Dn
    i32  sizes[S]          tokens per sequence
    i64  pointers[S]       byte offset of each sequence in `.bin` (exclusive prefix sum)
    i64  doc_idx[Dn]       document boundaries in the sequence list, starting with 0

Files written here are byte-identical to those of Megatron-LM / megatron-core, and theirs
load here unchanged. For GPT data every document is one sequence (`sizes` = document lengths).
"""
from __future__ import annotations

import logging
import mmap
import os
import struct

import numpy as np

log = logging.getLogger(__name__)

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, doc-index entries

DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron's preprocessing uses: uint16 below 65,500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def dtype_code(dtype) -> int:
    """The `.idx` code of a numpy dtype (ValueError if the format cannot store it)."""
    try:
        return _CODE_OF[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} cannot be stored in an MMIDIDX dataset; "
                         f"use one of {sorted(str(np.dtype(t)) for t in DTYPE_CODES.values())}") from None


def _map(path: str) -> mmap.mmap | bytes:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # mmap refuses empty files
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class IndexedDataset:
    """Read-only, zero-copy view of `<path_prefix>.bin` / `<path_prefix>.idx`."""

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = str(path_prefix)
        idx_path, bin_path = self.path_prefix + ".idx", self.path_prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"indexed dataset file not found: {p}")
        self._idx = _map(idx_path)
        if len(self._idx) < _HEADER.size:
            raise ValueError(f"{idx_path}: too short ({len(self._idx)} bytes) to be an MMIDIDX index")
        magic, version, code, n_seq, n_doc = _HEADER.unpack_from(self._idx, 0)
        if magic != _MAGIC:
            raise ValueError(f"{idx_path}: not an MMIDIDX index (magic {magic!r}, expected {_MAGIC!r}); "
                             "legacy TNTIDX/lazy formats are not supported")
        if version != _VERSION:
            raise ValueError(f"{idx_path}: unsupported MMIDIDX version {version} (expected {_VERSION})")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self._dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 12 * n_seq + 8 * n_doc
        if len(self._idx) < expected:
            raise ValueError(f"{idx_path}: truncated ({len(self._idx)} bytes, header needs {expected})")
        off = _HEADER.size
        self._sizes = np.frombuffer(self._idx, dtype="<i4", count=n_seq, offset=off)
        self._pointers = np.frombuffer(self._idx, dtype="<i8", count=n_seq, offset=off + 4 * n_seq)
        self._doc_idx = np.frombuffer(self._idx, dtype="<i8", count=n_doc, offset=off + 12 * n_seq)
        self._bin = _map(bin_path)
        need = int(self._pointers[-1]) + int(self._sizes[-1]) * self._dtype.itemsize if n_seq else 0
        if len(self._bin) < need:
            raise ValueError(f"{bin_path}: truncated ({len(self._bin)} bytes, its index {idx_path} needs {need}); "
                             "re-run the preprocessing of this file")
        if len(self._bin) > need:
            log.warning("%s: %d bytes, more than the %d its index %s describes (index from another file?)",
                        bin_path, len(self._bin), need, idx_path)

    # pickling (DataLoader workers with spawn): reopen the maps from the prefix
    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path_prefix"])

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(path_prefix + ".idx") and os.path.isfile(path_prefix + ".bin")

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i, as a read-only view into `.bin`."""
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.path_prefix}")
        size = int(self._sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} "
                             f"of {size} tokens in {self.path_prefix}")
        if length == 0:
            return np.empty(0, dtype=self._dtype)
        start = int(self._pointers[i]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin, dtype=self._dtype, count=length, offset=start)

    def max_token_id(self, sample_bytes: int | None = 1 << 16, windows: int = 8) -> int:
        """Largest token id in `.bin` (-1 if empty): exact when ``sample_bytes`` is None, else
        the maximum over ``windows`` evenly spaced windows of ``sample_bytes`` in total (cheap
        enough to run on every file at start-up; catches data tokenized with a larger vocabulary
        in practice, since such ids are everywhere)."""
        n_items = len(self._bin) // self._dtype.itemsize
        if n_items == 0:
            return -1
        tokens = np.frombuffer(self._bin, dtype=self._dtype, count=n_items)
        per = max(1, (sample_bytes or 0) // self._dtype.itemsize // max(windows, 1))
        if sample_bytes is None or per * windows >= n_items:
            return int(tokens.max())
        starts = np.linspace(0, n_items - per, windows).astype(np.int64)
        return int(max(tokens[s:s + per].max() for s in starts))

    @property
    def sizes(self) -> np.ndarray:
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        return self._doc_idx

    document_indices = doc_idx

    @property
    def dtype(self) -> np.dtype:
        return self._dtype


MMapIndexedDataset = IndexedDataset


class IndexedDatasetBuilder:
    """Writes `.bin` as items arrive; `finalize` writes the matching `.idx`."""

    def __init__(self, bin_path: str, dtype=np.uint16) -> None:
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self.bin_path = str(bin_path)
        self._file = open(self.bin_path, "wb")
        self._sizes: list[int] = []
        self._doc_idx: list[int] = [0]

    def add_item(self, tokens) -> None:
        """Append one sequence (list, numpy array or torch tensor)."""
        if hasattr(tokens, "detach"):  # torch.Tensor
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size and self.dtype.kind in "iu" and arr.dtype.kind in "iub":
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"token ids [{lo}, {hi}] do not fit in {self.dtype} "
                                 f"(writing {self.bin_path}); use a wider dtype")
        self._file.write(np.ascontiguousarray(arr, dtype=self.dtype.newbyteorder("<")).tobytes(order="C"))
        self._sizes.append(int(arr.size))

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        self.add_item(tokens)
        self.end_document()

    def finalize(self, idx_path: str) -> None:
        self._file.close()
        sizes = np.asarray(self._sizes, dtype="<i4")
        pointers = np.zeros(len(sizes), dtype="<i8")
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, self._code, len(sizes), len(self._doc_idx)))
            f.write(sizes.tobytes())
            f.write(pointers.tobytes())
            f.write(np.asarray(self._doc_idx, dtype="<i8").tobytes())
