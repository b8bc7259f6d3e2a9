"""A rank that died or hangs: turn the failed collective into one line that names it.

When a rank is killed, the others fail in their next collective: gloo at once ("Connection reset
by peer"), or after ``--distributed-timeout-minutes`` when the rank hangs. Instead of a traceback
from deep inside DeepSpeed, each surviving rank prints one line (pretrain_gpt.py, exit status 5):

    ERROR: rank 0: a collective operation failed (Connection reset by peer); no answer from rank 1 within 1.5 s (it died or hangs); the run cannot continue: restart it, it resumes from the last checkpoint

The survivors name the missing ranks through the rendezvous store: each writes
``megatron_fault/alive/<rank>`` and waits a short while (a quarter of the timeout, at most 5 s)
for the others' keys. When the store itself is unreachable, the rank hosting it (rank 0 under
mpiexec; torchrun's agent hosts its own) is the one gone. Launchers usually tear the job down
as well: torchrun and mpiexec stop the other workers when one dies and exit non-zero naming it.
"""
from __future__ import annotations

import logging
import time

import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_CODE = 5
_MARKERS = ("connection reset", "connection closed", "connection refused", "broken pipe", "timed out", "timeout",
            "gloo", "nccl", "ccl", "processgroup", "socket", "peer")
_PROBE_MAX_RANKS = 1024  # beyond this, naming the missing ranks would flood the store


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer died or hung."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, RuntimeError) or not dist.is_available() or not dist.is_initialized():
        return False
    text = str(exc).lower()
    return any(m in text for m in _MARKERS)


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for known in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused"):
        if known.lower() in text.lower():
            return known
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "timed out"
    return text[:160]


def missing_ranks(rank: int, world: int, wait_s: float) -> tuple[list[int] | None, str | None]:
    """(ranks that did not check in within wait_s, None) or (None, why the store could not tell)."""
    if world > _PROBE_MAX_RANKS:
        return None, None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"megatron_fault/alive/{rank}", "1")
        deadline = time.monotonic() + wait_s
        missing = [r for r in range(world) if r != rank]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"megatron_fault/alive/{r}"])]
            if missing:
                time.sleep(0.1)
        return missing, None
    except Exception as e:  # noqa: BLE001  (the store is gone: its host died)
        return None, f"the rendezvous store is unreachable ({_short_reason(e)}), so the rank hosting it is gone"


def describe(exc: BaseException, rank: int, world: int, timeout_minutes: float | None) -> str:
    """The one-line message for a failed collective (probes the store for the missing ranks)."""
    timeout_s = 60.0 * (timeout_minutes or 10.0)
    wait_s = min(5.0, 0.25 * timeout_s)
    missing, store_problem = missing_ranks(rank, world, wait_s)
    if missing:
        who = (f"no answer from rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing[:16]))}"
               f"{' ...' if len(missing) > 16 else ''} within {wait_s:g} s (died or hangs)")
    elif store_problem:
        who = store_problem
    else:
        who = "every rank still answers the store (a rank may have raised an error: see its log)"
    what = _short_reason(exc)
    if what == "timed out":
        what = f"timed out after --distributed-timeout-minutes {timeout_minutes:g} ({timeout_s:g} s)"
    return (f"rank {rank}: a collective operation failed ({what}); {who}; the run cannot continue: "
            "restart it, it resumes from the last checkpoint")
