"""Tokenizers (sentencepiece, Hugging Face, GPT-2 BPE, null) by upstream type name."""
from __future__ import annotations

from megatron.config import Config
from megatron.errors import ArgumentError
from megatron.tokenizer.tokenizer import TOKENIZER_TYPES, build_tokenizer, pad_vocab_size

__all__ = ["TOKENIZER_TYPES", "build_tokenizer", "pad_vocab_size", "run_tokenizer"]


def run_tokenizer(config: Config) -> tuple:
    """(the run's tokenizer, its vocabulary padded to --make-vocab-size-divisible-by x TP). The type is
    --tokenizer-type, or NullTokenizer when only --vocab-size is given; ArgumentError without either.
    A bad tokenizer file raises what its library raises (OSError, ValueError, RuntimeError...)."""
    data = config.data
    ttype = data.tokenizer_type or ("NullTokenizer" if data.vocab_size else None)
    if ttype is None:
        raise ArgumentError("no tokenizer: give --tokenizer-type/--tokenizer-model (TOKENIZER_TYPE/TOKENIZER_MODEL) "
                            "or --vocab-size")
    tok = build_tokenizer(ttype, data.tokenizer_model, vocab_size=data.vocab_size, vocab_file=data.vocab_file,
                          merge_file=data.merge_file, trust_remote_code=data.trust_remote_code)
    return tok, pad_vocab_size(tok.vocab_size, config.model.make_vocab_size_divisible_by,
                               config.parallel.tensor_model_parallel_size)
