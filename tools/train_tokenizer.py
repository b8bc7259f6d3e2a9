#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE or unigram) from text or JSON-lines files.

    python tools/train_tokenizer.py --input corpus.jsonl --json-key text \\
        --model-prefix tok/my32k --vocab-size 32000 --model-type bpe

writes ``<model-prefix>.model`` and ``.vocab``, usable with ``--tokenizer-type
SentencePieceTokenizer`` / ``Llama2Tokenizer`` and ``--tokenizer-model <prefix>.model``.
Inputs ending in ``.jsonl``/``.json`` are read one JSON document per line (``--json-key``);
other files are plain text. Ids: unk 0, bos 1, eos 2, no pad (Llama-2 layout); byte fallback on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator


def iter_lines(paths: list[str], json_key: str, max_chars: int = 1 << 16) -> Iterator[str]:
    """Non-empty text lines of every input (JSON documents split into lines; long lines cut)."""
    for path in paths:
        is_json = path.endswith((".jsonl", ".json"))
        with open(path, encoding="utf-8") as f:
            for n, raw in enumerate(f, start=1):
                if is_json:
                    if not raw.strip():
                        continue
                    try:
                        text = json.loads(raw)[json_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{n}: cannot read key {json_key!r}: {e}") from None
                    lines = str(text).splitlines()
                else:
                    lines = [raw.rstrip("\n")]
                for line in lines:
                    line = line.strip()
                    while line:
                        yield line[:max_chars]
                        line = line[max_chars:]


def train(inputs: list[str], model_prefix: str, vocab_size: int, model_type: str = "bpe",
          json_key: str = "text", character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
          threads: int = 2, seed_sentencepiece_size: int = 1_000_000) -> str:
    """Train and return the ``.model`` path (written atomically next to ``.vocab``)."""
    import sentencepiece as spm  # noqa: PLC0415

    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        text_file = os.path.join(tmp, "sentences.txt")
        n = 0
        with open(text_file, "w", encoding="utf-8") as f:
            for line in iter_lines(inputs, json_key):
                f.write(line + "\n")
                n += 1
        if n == 0:
            raise ValueError(f"no text in {', '.join(inputs)}")
        tmp_prefix = os.path.join(tmp, "model")
        spm.SentencePieceTrainer.train(
            input=text_file, model_prefix=tmp_prefix, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=character_coverage, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, num_threads=threads,
            seed_sentencepiece_size=seed_sentencepiece_size, minloglevel=2)
        os.replace(tmp_prefix + ".model", model_prefix + ".model")
        os.replace(tmp_prefix + ".vocab", model_prefix + ".vocab")
    return model_prefix + ".model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    p.add_argument("--json-key", default="text", help="key of the text in JSON-lines inputs (default: text)")
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    try:
        path = train(args.input, args.model_prefix, args.vocab_size, args.model_type, args.json_key,
                     args.character_coverage, args.max_sentences, args.threads)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"train_tokenizer.py: error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    import sentencepiece as spm  # noqa: PLC0415

    print(f"{path}: {spm.SentencePieceProcessor(model_file=path).get_piece_size()} pieces ({args.model_type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
