"""tools/preprocess_data.py: JSON lines and plain text to .bin/.idx, workers, progress, errors."""
import json
import os
import subprocess
import sys

import numpy as np

from megatron.data.indexed_dataset import IndexedDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")


def run(*args):
    return subprocess.run([sys.executable, TOOL, "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
                           *args], capture_output=True, text=True, timeout=120)


def docs_of(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))], ds


def test_jsonl_workers_and_progress(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 998, size=int(rng.integers(1, 40))).tolist() for _ in range(300)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": " ".join(map(str, d)), "id": i}) + "\n" for i, d in enumerate(docs))
                   + "\n")  # a trailing blank line is skipped
    for workers in ("1", "2"):
        r = run("--input", str(inp), "--output-prefix", str(tmp_path / f"w{workers}"), "--append-eod",
                "--workers", workers, "--log-interval", "100")
        assert r.returncode == 0, r.stderr
        got, ds = docs_of(str(tmp_path / f"w{workers}_text_document"))
        assert got == [d + [999] for d in docs] and ds.dtype == np.uint16
        progress = [line for line in r.stderr.splitlines() if line.startswith("processed")]
        assert [line.split()[1] for line in progress] == ["100", "200", "300"]
        assert all("docs/s" in line and "MB/s" in line for line in progress)
        tokens = sum(len(d) + 1 for d in docs)
        assert f"300 documents, {tokens} tokens, dtype uint16" in r.stdout
    assert (tmp_path / "w1_text_document.bin").read_bytes() == (tmp_path / "w2_text_document.bin").read_bytes()


def test_plain_text_inputs(tmp_path):
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("1 2 3\n4\n\n\n5 6\n   \n7\n")  # three documents
    r = run("--input", str(blocks), "--input-type", "text-blocks", "--output-prefix", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert docs_of(str(tmp_path / "b_text_document"))[0] == [[1, 2, 3, 4], [5, 6], [7]]
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("10 11\n\n12\n")
    (d / "a.txt").write_text("20\n")
    (d / "sub" / "c.txt").write_text("30 31 32")
    (d / "empty.txt").write_text("\n")
    r = run("--input", str(d), "--input-type", "text-file", "--output-prefix", str(tmp_path / "f"), "--append-eod")
    assert r.returncode == 0, r.stderr
    assert docs_of(str(tmp_path / "f_text_document"))[0] == [[20, 999], [10, 11, 12, 999], [30, 31, 32, 999]]


def test_bad_json_line_names_file_and_line(tmp_path):
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"text": "1 2"}\n{"body": "3"}\n')
    r = run("--input", str(inp), "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 1 and f"{inp}:2: cannot read keys ['text']" in r.stderr
    assert not any(p.name.startswith("x_") for p in tmp_path.iterdir())  # nothing half-written left
    r = run("--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "y"))
    assert r.returncode == 2 and "input not found" in r.stderr
