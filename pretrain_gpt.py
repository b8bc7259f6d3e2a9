#!/usr/bin/env python
"""Pretrain a Llama-style GPT under DeepSpeed ZeRO (Megatron-DeepSpeed compatible flags).

Usually started by `train_alcf.sh`, which turns environment variables into these flags.
Arguments are validated before anything expensive (DeepSpeed, data indices) starts; a bad
configuration prints one `ERROR:` line per problem and exits with status 2.
"""
from __future__ import annotations

import errno
import gc
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # this process's own command line: --allocator mimalloc re-executes it with the library preloaded
        from megatron.resilience.allocator import start_with

        start_with(sys.argv[1:])
    from megatron.arguments import ArgumentError, parse_args

    try:
        args = parse_args(argv)
    except ArgumentError as e:
        for line in str(e).splitlines():
            print(f"ERROR: {line}", file=sys.stderr)
        return 2
    if args.check_args:  # --check-args: also read the tokenizer and data files, then stop (megatron/resilience/preflight.py)
        from megatron.config import Config
        from megatron.resilience.preflight import preflight_problems

        problems = preflight_problems(Config.from_args(args))
        for line in problems:
            print(f"ERROR: {line}", file=sys.stderr)
        print("check-args: OK" if not problems else f"check-args: {len(problems)} problem(s)", file=sys.stderr)
        return 2 if problems else 0
    rank = int(os.environ.get("RANK") or os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO") if rank == 0 else logging.ERROR,
        format="[%(asctime)s][%(levelname).1s][%(name)s] %(message)s",
    )
    from megatron.resilience import dist_faults
    from megatron.checkpoint.io import CheckpointSaveError
    from megatron.data.data_list import DataListError
    from megatron.observability.numerics import NumericalFaultError
    from megatron.training import pretrain

    if __name__ == "__main__":
        # The imports (torch, DeepSpeed, and torch._dynamo, which torch.optim imports when it builds the first
        # optimizer) run without the cyclic GC (disabled below) and their ~300k long-lived objects are frozen
        # out of it: its full collections during the imports, and each gc.collect() DeepSpeed makes while
        # building its optimizers, cost ~0.2 s of CPU each otherwise.
        import torch._dynamo as _dynamo  # noqa: F401

        gc.freeze()
        gc.enable()
    try:
        pretrain(args)
    except (ArgumentError, DataListError, FileNotFoundError, NumericalFaultError, CheckpointSaveError) as e:
        # One line, no traceback: a configuration problem found while building data/model/checkpoints
        # (exit 2), --max-skipped-iterations reached after saving the last good state (exit 3), or a
        # checkpoint that could not be written, e.g. disk full (exit 4; 'latest' still names the previous one).
        if rank == 0 or os.environ.get("MEGATRON_LOG_ALL_RANKS"):
            print(f"ERROR: {e}", file=sys.stderr)
        return 3 if isinstance(e, NumericalFaultError) else 4 if isinstance(e, CheckpointSaveError) else 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # disk full outside a checkpoint save (metrics/log files): the checkpoint on disk is intact
        what = f"writing {e.filename}" if e.filename else "a write"
        print(f"ERROR: {what} failed (disk full): [Errno {e.errno}] {e.strerror}; check the space where --save "
              f"({args.save}) and --metrics-file ({args.metrics_file}) write; the last checkpoint is intact: free "
              "space and resume with --load", file=sys.stderr, flush=True)
        return 4
    except RuntimeError as e:  # (torch.OutOfMemoryError is one)
        from megatron.resilience.preflight import OOM_EXIT_CODE, is_out_of_memory, oom_message

        if is_out_of_memory(e):  # a device (or the CPU allocator) refused an allocation: one line, exit 6
            print(f"ERROR: {oom_message(e, rank, args.memory_estimate)}", file=sys.stderr,
                  flush=True)
            return OOM_EXIT_CODE
        if not dist_faults.is_collective_failure(e):
            raise
        # another rank died or hangs (megatron/resilience/dist_faults.py): every survivor names it, exit 5
        print(f"ERROR: {dist_faults.describe(e, rank, args.world_size, args.distributed_timeout_minutes)}",
              file=sys.stderr, flush=True)
        return dist_faults.EXIT_CODE
    return 0


if __name__ == "__main__":
    gc.disable()  # until the imports are done (main)
    code = main()
    # Every sink is closed and the checkpoint written by now. Skip the interpreter's teardown: gloo's and
    # DeepSpeed's C++ threads were seen to abort it now and then after a finished 2-rank run
    # ("terminate called without an active exception", SIGABRT), turning a good run into a failed one.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
