"""tools/train_tokenizer.py: sentencepiece BPE/unigram from text and JSON lines."""
import json
import os
import subprocess
import sys

import pytest

sentencepiece = pytest.importorskip("sentencepiece")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega").split()


def corpus_lines(n=400):
    import random
    rng = random.Random(0)
    vocab = WORDS + ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                     for _ in range(300)]
    return [" ".join(rng.choice(vocab) for _ in range(12)) for _ in range(n)]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_from_text_and_jsonl(tmp_path, model_type):
    from train_tokenizer import iter_lines, train
    lines = corpus_lines()
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(lines[:200]) + "\n\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"body": "\n".join(lines[i:i + 2])}) + "\n" for i in range(200, 400, 2)))
    assert list(iter_lines([str(txt), str(jsonl)], "body")) == lines  # blank lines dropped, docs split
    model = train([str(txt), str(jsonl)], str(tmp_path / "tok" / "m"), vocab_size=320, model_type=model_type,
                  json_key="body", character_coverage=1.0, threads=1)
    assert model == str(tmp_path / "tok" / "m.model") and os.path.isfile(str(tmp_path / "tok" / "m.vocab"))
    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    assert sp.get_piece_size() == 320
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    from megatron.tokenizer import build_tokenizer
    tok = build_tokenizer("SentencePieceTokenizer", model)
    ids = tok.tokenize("gamma delta omega")
    assert tok.detokenize(ids) == "gamma delta omega" and len(ids) < len("gamma delta omega")
    assert tok.tokenize("ü") != [0]  # byte fallback: no unknown id


def test_cli_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{"other": 1}\n')
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", str(bad),
                        "--model-prefix", str(tmp_path / "m"), "--vocab-size", "50"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"train_tokenizer.py: error: {bad}:2: cannot read key 'text': 'text'")
    assert not os.path.exists(tmp_path / "m.model")
