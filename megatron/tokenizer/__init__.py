"""Tokenizers (sentencepiece, Hugging Face, GPT-2 BPE, null) by upstream type name."""
from megatron.tokenizer.tokenizer import TOKENIZER_TYPES, build_tokenizer, pad_vocab_size

__all__ = ["TOKENIZER_TYPES", "build_tokenizer", "pad_vocab_size"]
