"""Start-up checks that read files (tokenizer, data list, `.bin`/`.idx` headers, token ids vs the
vocabulary), run before anything is written or started.

`pretrain_gpt.py --check-args` runs `parse_args` (the configuration checks of
megatron/arguments.py, including `--load` and `--save`) and then `preflight_problems`, prints one
``ERROR:`` line per problem and exits 2, or prints ``OK`` and exits 0. No process group, no
DeepSpeed, no index building: the launcher (ALCF/helpers.sh) runs it before it creates the run's
directories, so a bad data file or tokenizer path leaves nothing behind.
"""
from __future__ import annotations

import argparse
import os

from megatron.data.data_list import DataListError, DataSource, parse_data_file_list, validate_sources


def tokenizer_vocab(args: argparse.Namespace) -> tuple[int | None, list[str]]:
    """(padded vocabulary size or None, problems) of the configured tokenizer."""
    from megatron.tokenizer import build_tokenizer, pad_vocab_size  # noqa: PLC0415

    ttype = args.tokenizer_type or ("NullTokenizer" if args.vocab_size else None)
    if ttype is None:
        return None, ["no tokenizer: give --tokenizer-type/--tokenizer-model (TOKENIZER_TYPE/TOKENIZER_MODEL) "
                      "or --vocab-size"]
    try:
        tok = build_tokenizer(ttype, args.tokenizer_model, vocab_size=args.vocab_size,
                              vocab_file=args.vocab_file, merge_file=args.merge_file,
                              trust_remote_code=args.trust_remote_code)
        return pad_vocab_size(tok.vocab_size, args.make_vocab_size_divisible_by,
                              args.tensor_model_parallel_size), []
    except (OSError, ValueError, RuntimeError, TypeError) as e:  # sentencepiece raises RuntimeError on a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, [f"tokenizer {ttype} ({args.tokenizer_model}): {first}; check TOKENIZER_MODEL / --tokenizer-model"]


def data_sources(args: argparse.Namespace) -> list[DataSource]:
    """The datasets of --data-file-list or --data-path (DataListError if the list is unusable)."""
    if args.data_file_list:
        return parse_data_file_list(args.data_file_list)
    dp = args.data_path
    if len(dp) % 2 and len(dp) > 1:
        raise DataListError(f"--data-path: expected 'prefix' or 'weight prefix weight prefix ...', got {' '.join(dp)!r}")
    try:
        pairs = [(1.0, dp[0])] if len(dp) == 1 else [(float(dp[i]), dp[i + 1]) for i in range(0, len(dp), 2)]
    except ValueError:
        raise DataListError(f"--data-path: weights must be numbers, got {' '.join(dp)!r}") from None
    return [DataSource(w, p[:-4] if p.endswith(".bin") else p, os.path.basename(p)) for w, p in pairs]


def data_problems(args: argparse.Namespace, vocab_size: int | None) -> list[str]:
    """Unreadable list, missing files, bad `.idx`/`.bin` (magic, version, truncation), token ids >= vocab."""
    from megatron.data.blendable_dataset import check_data_vocab  # noqa: PLC0415
    from megatron.data.indexed_dataset import IndexedDataset  # noqa: PLC0415

    try:
        sources = data_sources(args)
        validate_sources(sources)
    except DataListError as e:
        return [str(e)]
    errs = []
    prefixes = list(dict.fromkeys(s.prefix for s in sources))
    for prefix in prefixes:
        try:
            IndexedDataset(prefix)
        except (ValueError, OSError) as e:
            errs.append(f"{e} (rebuild it with tools/preprocess_data.py, or remove it from the data list)")
    if not errs and vocab_size:
        try:
            check_data_vocab(prefixes, vocab_size)
        except ValueError as e:
            errs.append(str(e))
    return errs


def preflight_problems(args: argparse.Namespace) -> list[str]:
    """Every problem found by reading the tokenizer and the data (after `parse_args` succeeded)."""
    vocab, errs = tokenizer_vocab(args)
    return errs + data_problems(args, vocab)
