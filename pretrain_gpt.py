#!/usr/bin/env python
"""Pretrain a Llama-style GPT under DeepSpeed ZeRO (Megatron-DeepSpeed compatible flags).

Usually started by `train_alcf.sh`, which turns environment variables into these flags.
Arguments are validated before anything expensive (DeepSpeed, data indices) starts; a bad
configuration prints one `ERROR:` line per problem and exits with status 2.
"""
from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from megatron.arguments import ArgumentError, parse_args

    try:
        args = parse_args(argv)
    except ArgumentError as e:
        for line in str(e).splitlines():
            print(f"ERROR: {line}", file=sys.stderr)
        return 2
    if args.check_args:  # --check-args: also read the tokenizer and data files, then stop (megatron/preflight.py)
        from megatron.preflight import preflight_problems

        problems = preflight_problems(args)
        for line in problems:
            print(f"ERROR: {line}", file=sys.stderr)
        print("check-args: OK" if not problems else f"check-args: {len(problems)} problem(s)", file=sys.stderr)
        return 2 if problems else 0
    rank = int(os.environ.get("RANK") or os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO") if rank == 0 else logging.ERROR,
        format="[%(asctime)s][%(levelname).1s][%(name)s] %(message)s",
    )
    from megatron.data.data_list import DataListError
    from megatron.numerics import NumericalFaultError
    from megatron.training import pretrain

    try:
        pretrain(args)
    except (ArgumentError, DataListError, FileNotFoundError, NumericalFaultError) as e:
        # One line, no traceback: a configuration problem found while building data/model/checkpoints
        # (exit 2), or --max-skipped-iterations reached after saving the last good state (exit 3).
        if rank == 0 or os.environ.get("MEGATRON_LOG_ALL_RANKS"):
            print(f"ERROR: {e}", file=sys.stderr)
        return 3 if isinstance(e, NumericalFaultError) else 2
    return 0


if __name__ == "__main__":
    code = main()
    # Every sink is closed and the checkpoint written by now. Skip the interpreter's teardown: gloo's and
    # DeepSpeed's C++ threads were seen to abort it now and then after a finished 2-rank run
    # ("terminate called without an active exception", SIGABRT), turning a good run into a failed one.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
