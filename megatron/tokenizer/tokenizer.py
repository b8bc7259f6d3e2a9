"""Tokenizers by their upstream ``--tokenizer-type`` names.

Every tokenizer has ``vocab_size``, ``eod`` (the id appended after each document), ``bos``
(or None), ``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``. sentencepiece and
transformers are imported only when a tokenizer that needs them is built.

Differences from upstream: ``SentencePieceTokenizer`` does not append Megatron's BERT/T5
special tokens (<CLS>, <SEP>, <EOD>, <MASK>) to the vocabulary; its ``eod`` is the model's
eos id, as for ``GPTSentencePieceTokenizer``. ``NullTokenizer``'s ``vocab_size`` includes the
eod id (``eod = vocab_size - 1``).
"""
from __future__ import annotations

import json
import os


class MegatronTokenizer:
    """Common interface; subclasses set ``vocab_size``, ``eod`` and ``bos``."""

    vocab_size: int
    eod: int
    bos: int | None = None

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids) -> str:
        raise NotImplementedError


def _require_file(path: str | None, what: str, ttype: str) -> str:
    if not path:
        raise ValueError(f"{ttype} needs {what}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{ttype}: {what} not found: {path}")
    return path


class SentencePieceTokenizer(MegatronTokenizer):
    """A sentencepiece model; ``eod`` = the model's eos id. Plain ``encode`` (no bos/eos)."""

    add_bos = False

    def __init__(self, model_file: str | None) -> None:
        import sentencepiece as spm  # noqa: PLC0415

        path = _require_file(model_file, "--tokenizer-model (a sentencepiece .model file)", type(self).__name__)
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self._sp.get_piece_size())
        eos, bos = int(self._sp.eos_id()), int(self._sp.bos_id())
        if eos < 0:
            raise ValueError(f"{path}: the sentencepiece model has no eos piece (needed as end-of-document)")
        self.eod = eos
        self.bos = bos if bos >= 0 else None
        self.pad = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        if self.add_bos and self.bos is not None:
            ids = [self.bos] + ids
        return ids

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class GPTSentencePieceTokenizer(SentencePieceTokenizer):
    """Upstream's GPT flavour: same as above (no extra ids, eod = eos)."""


class Llama2Tokenizer(SentencePieceTokenizer):
    """Llama-2 style: ``tokenize`` prepends bos (upstream default ``bos=True, eos=False``)."""

    add_bos = True


class HFTokenizer(MegatronTokenizer):
    """``transformers.AutoTokenizer`` from a local directory (no hub access); eod = eos_token_id.

    As upstream, missing special tokens ([PAD], </s>, <s>, <unk>) are added, and ``tokenize``
    uses the tokenizer's own special-token handling (e.g. a leading bos for Llama tokenizers).
    """

    def __init__(self, path: str | None, trust_remote_code: bool = False) -> None:
        path = _require_file(path, "--tokenizer-model (a local Hugging Face tokenizer directory)", "HFTokenizer")
        from transformers import AutoTokenizer  # noqa: PLC0415

        # --trust-remote-code: run the tokenizer's own Python code shipped in its directory
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="right",
                                                  trust_remote_code=trust_remote_code)
        missing = {key: tok for key, tok in (("pad_token", "[PAD]"), ("eos_token", "</s>"),
                                             ("bos_token", "<s>"), ("unk_token", "<unk>"))
                   if getattr(self._tok, key) is None}
        if missing:
            self._tok.add_special_tokens(missing)
        self.vocab_size = len(self._tok)
        self.eod = int(self._tok.eos_token_id)
        self.bos = self._tok.bos_token_id

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok(text).input_ids)

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


class GPT2BPETokenizer(MegatronTokenizer):
    """GPT-2 byte-level BPE from ``--vocab-file`` (vocab.json) and ``--merge-file`` (merges.txt)."""

    def __init__(self, vocab_file: str | None, merge_file: str | None) -> None:
        _require_file(vocab_file, "--vocab-file", "GPT2BPETokenizer")
        _require_file(merge_file, "--merge-file", "GPT2BPETokenizer")
        import inspect  # noqa: PLC0415

        from transformers import GPT2TokenizerFast  # noqa: PLC0415

        if "vocab_file" in inspect.signature(GPT2TokenizerFast.__init__).parameters:  # transformers < 5
            self._tok = GPT2TokenizerFast(vocab_file=vocab_file, merges_file=merge_file)
        else:  # transformers >= 5 takes the vocabulary and merges themselves
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merge_file, encoding="utf-8") as f:
                merges = [tuple(line.split()) for line in f
                          if line.strip() and not line.startswith("#version")]
            self._tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
        self.vocab_size = len(self._tok)
        vocab = self._tok.get_vocab()
        if "<|endoftext|>" not in vocab:
            raise ValueError(f"{vocab_file}: no <|endoftext|> token (the GPT-2 end of document)")
        self.eod = int(vocab["<|endoftext|>"])

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


class NullTokenizer(MegatronTokenizer):
    """Text is space-separated integer ids; ``eod = vocab_size - 1``."""

    def __init__(self, vocab_size: int | None) -> None:
        if vocab_size is None or int(vocab_size) < 2:
            raise ValueError("NullTokenizer needs --vocab-size >= 2")
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HFTokenizer", "GPT2BPETokenizer", "NullTokenizer")


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None,
                    vocab_file: str | None = None, merge_file: str | None = None,
                    trust_remote_code: bool = False) -> MegatronTokenizer:
    """The tokenizer named ``tokenizer_type`` (upstream spelling)."""
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        cls = {"SentencePieceTokenizer": SentencePieceTokenizer,
               "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer,
               "Llama2Tokenizer": Llama2Tokenizer}[tokenizer_type]
        return cls(tokenizer_model)
    if tokenizer_type == "HFTokenizer":
        return HFTokenizer(tokenizer_model, trust_remote_code=trust_remote_code)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; valid types: {', '.join(TOKENIZER_TYPES)}")


def pad_vocab_size(orig: int, divisible_by: int = 128, tp: int = 1) -> int:
    """``orig`` rounded up to a multiple of ``divisible_by * tp`` (Megatron's padded vocab)."""
    multiple = int(divisible_by) * int(tp)
    if multiple <= 0:
        raise ValueError(f"divisible_by * tp must be > 0, got {divisible_by} * {tp}")
    return -(-int(orig) // multiple) * multiple
