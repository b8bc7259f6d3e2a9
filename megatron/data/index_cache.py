"""The on-disk cache of dataset index arrays (``--data-cache-path``).

One entry = one file ``<md5 of the description>.idxc`` holding the description text and every
array of the entry (e.g. a file's ``doc_idx``, ``sample_idx`` and ``shuffle_idx``):

    bytes 0..7    magic ``b"MGIDXC01"``
    bytes 8..15   header length H (little-endian uint64)
    bytes 16..    H bytes of JSON: {"description": str, "arrays": {name: {"dtype", "shape", "offset"}}}
    then          each array's raw bytes (C order) at its offset, aligned to 64 bytes

One file per entry rather than one ``.npy`` per array: a data list of thousands of files makes
thousands of entries, and on parallel file systems creating and opening files is what costs
(a third of the files to create on a cold start, a third to open on a warm one). Loading maps
the file once (``mmap``) and returns read-only views, so nothing is read until it is used.

Writes go to a temporary name in the same directory and are renamed into place, so a reader
never sees a partial entry, and concurrent builders (ranks of one job) write identical content.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"MGIDXC01"
_ALIGN = 64


def _atomic_write(path: str, write: Callable[[object], None]) -> None:
    """Write ``path`` through a temporary file in the same directory and rename it into place.
    The temporary name is unique to this process and thread (no mkstemp: its files are private
    to the owner, and a shared data cache must follow the umask)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_entry(path: str, description: str, arrays: dict[str, np.ndarray]) -> None:
    """Write one cache entry (atomically)."""
    arrays = {n: np.ascontiguousarray(a) for n, a in arrays.items()}
    layout, offset = {}, 0
    for n, a in arrays.items():
        layout[n] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"description": description, "arrays": layout}).encode("utf-8")
    start = -(-(len(MAGIC) + 8 + len(header)) // _ALIGN) * _ALIGN  # arrays' offsets are relative to this

    def write(f) -> None:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        f.write(b"\0" * (start - f.tell()))
        for n, a in arrays.items():
            f.write(b"\0" * (start + layout[n]["offset"] - f.tell()))
            a.tofile(f)

    _atomic_write(path, write)


def read_entry(path: str) -> tuple[str, dict[str, np.ndarray]]:
    """(description, arrays) of one cache entry; the arrays are read-only views of a shared map.
    Raises ValueError for a file that is not a complete entry."""
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise ValueError(f"{path}: not an index cache entry (bad magic)")
        (n,) = struct.unpack("<Q", head[8:])
        meta = json.loads(f.read(n).decode("utf-8"))
        start = -(-(16 + n) // _ALIGN) * _ALIGN
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    arrays = {}
    for name, spec in meta["arrays"].items():
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        begin = start + spec["offset"]
        if begin + count * dtype.itemsize > size:
            raise ValueError(f"{path}: truncated index cache entry (array {name})")
        arrays[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=begin).reshape(shape) if count else \
            np.empty(shape, dtype=dtype)
    return meta["description"], arrays


def cached_index_arrays(cache_dir: str | None, description: str, names: tuple[str, ...],
                        build: Callable[[], dict[str, np.ndarray]],
                        stats: dict | None = None) -> dict[str, np.ndarray]:
    """Arrays ``names`` from the entry ``<cache_dir>/<md5(description)>.idxc`` (memory-mapped),
    else ``build()`` them and write the entry. ``stats`` (optional) counts entries ``built`` and
    ``loaded``. An unreadable entry, or one whose description differs (an md5 collision), is rebuilt."""
    def count(what: str) -> None:
        if stats is not None:
            stats[what] = stats.get(what, 0) + 1

    if cache_dir is None:
        count("built")
        return build()
    path = os.path.join(cache_dir, hashlib.md5(description.encode("utf-8")).hexdigest() + ".idxc")
    if os.path.isfile(path):
        try:
            stored, arrays = read_entry(path)
            if stored == description and set(names) <= set(arrays):
                count("loaded")
                return {n: arrays[n] for n in names}
            log.warning("rebuilding index cache entry %s: it was written for another description", path)
        except (OSError, ValueError) as e:
            log.warning("rebuilding unreadable index cache entry %s: %s", path, e)
    count("built")
    arrays = build()
    os.makedirs(cache_dir, exist_ok=True)
    write_entry(path, description, {n: arrays[n] for n in names})
    return arrays
