"""Tokenizers by upstream type name; vocabulary padding."""
import json

import pytest

from megatron.tokenizer import TOKENIZER_TYPES, build_tokenizer, pad_vocab_size

TEXT = """the quick brown fox jumps over the lazy dog
a stitch in time saves nine and the early bird catches the worm
all that glitters is not gold but the brown dog is quick
""" * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "text.txt").write_text(TEXT)
    spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "m"), vocab_size=60,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    return str(d / "m.model")


@pytest.mark.parametrize("ttype", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_sentencepiece_family(sp_model, ttype):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer(ttype, sp_model)
    assert tok.vocab_size == sp.get_piece_size() == 60
    assert tok.eod == 2 and tok.bos == 1
    ids = tok.tokenize("the quick brown dog")
    plain = sp.encode("the quick brown dog")
    assert ids == ([1] + plain if ttype == "Llama2Tokenizer" else plain)  # Llama2: bos=True, eos=False
    assert all(0 <= i < 60 for i in ids) and len(plain) < len("the quick brown dog")
    assert tok.detokenize(plain) == "the quick brown dog"


def test_sentencepiece_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("Llama2Tokenizer", str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("GPTSentencePieceTokenizer", None)


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "\u0120": 4, "\u0120ab": 5}  # \u0120 = byte-level space
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\na b\n\u0120 ab\n")
    return str(d / "vocab.json"), str(d / "merges.txt")


def test_gpt2_bpe_and_hf(gpt2_files, tmp_path):
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=gpt2_files[1])
    assert tok.vocab_size == 6 and tok.eod == 0
    assert tok.tokenize("ab ab") == [3, 5] and tok.detokenize([3, 5, 3]) == "ab abab"
    # the same tokenizer saved as a local Hugging Face directory
    tok._tok.save_pretrained(str(tmp_path / "hf"))
    hf = build_tokenizer("HFTokenizer", str(tmp_path / "hf"))
    assert hf.eod == 0 and hf.tokenize("ab ab") == [3, 5]
    assert hf.vocab_size == 7  # upstream adds a [PAD] token when the tokenizer has none
    with pytest.raises(FileNotFoundError, match="local Hugging Face tokenizer directory"):
        build_tokenizer("HFTokenizer", "meta-llama/Llama-2-7b-hf")


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert tok.vocab_size == 1000 and tok.eod == 999 and tok.bos is None
    assert tok.tokenize("5 17  42\n7") == [5, 17, 42, 7] and tok.detokenize([1, 2, 3]) == "1 2 3"
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


def test_unknown_type_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        build_tokenizer("Llama3Tokenizer", "x")
    assert all(t in str(e.value) for t in TOKENIZER_TYPES) and len(TOKENIZER_TYPES) == 6


def test_pad_vocab_size():
    assert pad_vocab_size(32000) == 32000
    assert pad_vocab_size(32001) == 32128
    assert pad_vocab_size(50257, 128, 1) == 50304
    assert pad_vocab_size(50257, 128, 4) == 50688  # multiple of 512
    assert pad_vocab_size(8000, 128, 2) == 8192
    assert pad_vocab_size(1) == 128
