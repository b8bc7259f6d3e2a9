"""Reading and writing checkpoint files safely: restricted unpickling, write failures reported.

Loading. A `.pt` file is a pickle, and unpickling can run any code the file names (an object
whose ``__reduce__`` returns ``os.system``...). Every checkpoint file this framework reads goes
through `torch_load`, which is ``torch.load(weights_only=True)`` with a short allowlist: the
types our checkpoints contain besides tensors (numpy arrays of the RNG state, DeepSpeed's
`LossScaler`, `ZeroStageEnum` and `fragment_address` in ZeRO optimizer shards, and
`argparse.Namespace`, which upstream Megatron-DeepSpeed stores as its `args`). Anything else is
refused with one line (`CheckpointLoadRefused`, exit 2) naming the file and the first foreign
global, before it can run. ``--unsafe-checkpoint-load`` lifts the restriction for a file you
trust (``weights_only=False``). DeepSpeed's engine reads through its checkpoint engine, which
`guard_engine` wraps so that it uses `torch_load` too.

Exception: with ``--universal-checkpoint`` DeepSpeed reads the per-parameter atom files of a
universal checkpoint itself (``deepspeed/checkpoint/universal_checkpoint.py``, with
``torch.load(weights_only=False)``): only load universal checkpoints you converted yourself.

Writing. `torch.save` to a path reports a full disk as an opaque ``RuntimeError`` ("unexpected
pos ... vs ...") from its zip writer. The wrapped checkpoint engine saves through a file object
that keeps the `OSError` (``[Errno 28] No space left on device``), removes the half-written file,
and does not raise: DeepSpeed's save continues (its collectives stay matched on every rank) and
`megatron.checkpoint.checkpointing.save_checkpoint` then reports the failure from every rank at once
(`CheckpointSaveError`).

Test hook: ``MEGATRON_TEST_FAULTS=enospc@k`` makes the save of iteration k fail with ENOSPC after
its first 64 KiB (megatron/observability/numerics.py parses the variable).
"""
from __future__ import annotations

import argparse
import enum
import errno
import io
import logging
import os
import pickle
import re

import torch

from megatron.checkpoint import manifest as checkpoint_manifest
from megatron.config import CheckpointConfig
from megatron.deepspeed_compat.engine import is_plain_torch_checkpoint_engine, replace_checkpoint_engine

log = logging.getLogger(__name__)

INJECTED_WRITE_LIMIT = 64 * 1024  # bytes a save with an injected ENOSPC writes before failing


class CheckpointLoadRefused(ValueError):
    """A checkpoint file holds Python objects outside the allowlist (it could run code)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; `latest` still names the previous complete one."""


def _enum_member(cls, name):
    """What `builtins.getattr` may do in a checkpoint: fetch a member of an Enum class that is itself on
    the allowlist. Some Python builds (3.11.2, 3.12+) pickle an Enum member as `getattr(cls, name)`
    instead of `cls(value)`, e.g. DeepSpeed's `ZeroStageEnum` in every ZeRO optimizer shard; any
    other attribute is refused (a getattr on an allowed class could reach its methods)."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not an Enum member")


def safe_globals() -> list:
    """Non-tensor types our checkpoints (and upstream's) are allowed to contain."""
    import numpy as np  # noqa: PLC0415

    allowed: list = [argparse.Namespace, np.ndarray, np.dtype, (_enum_member, "builtins.getattr")]
    try:
        from numpy._core.multiarray import _reconstruct  # noqa: PLC0415  (numpy >= 2)
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # noqa: PLC0415
    allowed.append(_reconstruct)
    allowed += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float32, np.float64)]  # numpy.dtypes.*DType
    try:
        from megatron.deepspeed_compat.universal import checkpoint_pickle_types  # noqa: PLC0415

        allowed += checkpoint_pickle_types()
    except ImportError:  # pragma: no cover - DeepSpeed is a dependency; tools may run without it
        pass
    return allowed


_FOREIGN = re.compile(r"GLOBAL ([\w.]+)")  # torch's message names the first global it refused


def torch_load(path, map_location=None, *, unsafe: bool = False):
    """`torch.load` of a checkpoint file: weights_only with the allowlist, or (unsafe=True) full pickle."""
    if unsafe:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = _FOREIGN.search(str(e))
        what = m.group(1) if m else str(e).strip().splitlines()[-1][:200]
        raise CheckpointLoadRefused(
            f"refusing to load {path}: it holds a Python object outside the checkpoint allowlist ({what}); "
            "unpickling it could run code. Use a checkpoint written by this framework, or add "
            "--unsafe-checkpoint-load if you trust the file") from None


def _qualified(obj) -> str:
    if isinstance(obj, tuple):  # (replacement, "the name in the pickle")
        return obj[1]
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def check_pickle_globals(path: str) -> None:
    """Refuse a file whose pickle names a global outside the allowlist, reading only its pickle
    (not the tensor data): the cheap check before code that loads with weights_only=False
    (DeepSpeed's converters). Legacy (non-zip) files are checked by a full restricted load."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001  (not a zip checkpoint: load it the restricted way)
        torch_load(path, map_location="cpu")
        return
    allowed = {_qualified(g) for g in safe_globals()}
    allowed |= {n.replace("numpy._core.", "numpy.core.") for n in allowed}
    foreign = [n for n in names if n not in allowed]
    if foreign:
        raise CheckpointLoadRefused(
            f"refusing to load {path}: it holds a Python object outside the checkpoint allowlist ({foreign[0]}); "
            "unpickling it could run code. Use a checkpoint written by this framework, or add "
            "--unsafe-checkpoint-load if you trust the file")


class _RecordingFile(io.RawIOBase):
    """A binary file that remembers the OSError of a failed write (torch.save turns it into an
    opaque RuntimeError) and can simulate a full disk after `limit` bytes."""

    def __init__(self, path: str, limit: int | None = None, hasher=None):
        super().__init__()
        self._f = open(path, "wb")  # noqa: SIM115  (closed in close())
        self.path, self.limit, self.written, self.error = path, limit, 0, None
        self.hasher = hasher  # fed every block written (the checkpoint manifest's checksum, no read-back)

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            if self.limit is not None and self.written + len(b) > self.limit:
                self._f.write(bytes(b)[: max(self.limit - self.written, 0)])
                self._f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected by MEGATRON_TEST_FAULTS)",
                              self.path)
            n = self._f.write(b)
            self.written += n
            if self.hasher is not None:
                self.hasher.update(memoryview(b)[:n] if n != len(b) else b)
            return n
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        if self._f.closed:
            return
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def close(self) -> None:
        if not self.closed:
            try:
                self._f.close()
            except OSError as e:
                self.error = self.error or e
        super().close()


class GuardedCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine (delegating everything else): loads with `torch_load`,
    and records a failed save instead of raising (see the module docstring)."""

    def __init__(self, inner, unsafe_load: bool = False):
        self._inner = inner
        self.unsafe_load = unsafe_load
        self.failure: str | None = None  # "<file>: <reason>" of the first failed write of this save
        self.inject_enospc = False
        self.algorithm = checkpoint_manifest.default_algorithm()
        self.written: dict[str, tuple[int, str | None]] = {}  # path -> (size, checksum) of this save's files
        self._reuse: tuple | None = None  # (key, object) of the last load, handed out once more

    def __getattr__(self, name):
        if name == "_inner":  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def _plain_torch(self) -> bool:
        return is_plain_torch_checkpoint_engine(self._inner)

    def start_save(self, inject_enospc: bool = False) -> None:
        self.failure, self.inject_enospc, self.written = None, inject_enospc, {}

    def save(self, state_dict, path: str) -> None:
        if self.failure:  # this checkpoint is lost already: do not fill the disk further
            return
        if not self._plain_torch() and not self.inject_enospc:
            try:
                self._inner.save(state_dict, path)
                self.written[path] = (-1, None)  # hashed from the file (checkpoint_manifest.entry)
            except (OSError, RuntimeError) as e:
                self._record(path, e)
            return
        f = None
        try:
            f = _RecordingFile(path, INJECTED_WRITE_LIMIT if self.inject_enospc else None,
                               checkpoint_manifest.new_hasher(self.algorithm))
            torch.save(state_dict, f, _use_new_zipfile_serialization=getattr(self._inner, "zipfile_serialization",
                                                                             True))
            f.close()
            if f.error:
                raise f.error
            self.written[path] = (f.written, f.hasher.hexdigest())
        except (OSError, RuntimeError) as e:
            if f is not None:
                f.close()
            self._record(path, f.error if f is not None and f.error else e)

    def manifest_entries(self, tag_dir: str, rank: int) -> dict:
        """{name relative to tag_dir: manifest entry} of the files this rank wrote in this save."""
        out = {}
        for path, (size, digest) in self.written.items():
            rel = os.path.relpath(path, tag_dir).replace(os.sep, "/")
            e = checkpoint_manifest.entry(path, self.algorithm, digest, rank)
            if size >= 0 and e["size"] != size:  # changed since it was written: hash what is there
                e = checkpoint_manifest.entry(path, self.algorithm, None, rank)
            out[rel] = e
        return out

    def _record(self, path: str, e: BaseException) -> None:
        reason = f"[Errno {e.errno}] {e.strerror}" if isinstance(e, OSError) and e.errno else str(e).splitlines()[0]
        self.failure = f"{path}: {reason}"
        try:
            os.remove(path)
        except OSError:
            pass
        log.error("checkpoint write failed: %s", self.failure)

    def load(self, path: str, map_location=None):
        """DeepSpeed reads the first model-states file twice per load (its state-dict loader checks
        the saved `mp_world_size`, then loads the file again), both times with the identity
        map_location. The second read of the same unchanged file returns the first one's object, once
        (it was only read): at ZeRO stage 0 that file holds the optimizer state too, and the second
        read made a load 2.8x slower than torch.load of the same bytes."""
        key = _file_key(path) if callable(map_location) else None  # DeepSpeed's identity map_location
        reuse, self._reuse = self._reuse, None
        if key is not None and reuse is not None and reuse[0] == key:
            return reuse[1]
        if not self._plain_torch():
            obj = self._inner.load(path, map_location=map_location)
        else:
            obj = torch_load(path, map_location, unsafe=self.unsafe_load)
        if key is not None:
            self._reuse = (key, obj)
        return obj

    def end_load(self) -> None:
        """Drop the object kept for a second read (call when a checkpoint load is over)."""
        self._reuse = None


def _file_key(path: str) -> tuple | None:
    """Identifies one version of a file (None if it cannot be stat'ed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def guard_engine(engine, ckpt: CheckpointConfig) -> GuardedCheckpointEngine | None:
    """Wrap `engine.checkpoint_engine` once; returns the wrapper (None when the engine has none)."""
    inner = replace_checkpoint_engine(engine, GuardedCheckpointEngine, GuardedCheckpointEngine)
    if inner is None:
        return None
    inner.unsafe_load = bool(ckpt.unsafe_checkpoint_load)
    return inner


def is_disk_full(reason: str) -> bool:
    return "Errno 28" in reason or "No space left" in reason or "Errno 122" in reason  # ENOSPC, EDQUOT
