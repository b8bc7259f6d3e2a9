"""The command-line frame shared by the checkpoint converters (to_hf.py, from_hf.py): the
repository importable, INFO logging, and an expected error as one `ERROR:` line with exit
status 2 (as pretrain_gpt.py) instead of a traceback."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, TypeVar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError)  # missing files, bad input

T = TypeVar("T")


def run_cli(action: Callable[[], T], report: Callable[[T], str],
            errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """Run `action()`; print `report(result)` and return 0, or print `ERROR: <message>` on stderr
    and return 2 when it raises one of `errors`."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = action()
    except errors as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(report(result), flush=True)
    return 0
