"""mix_datasets.py CLI: two-level normalization, output format, error exits."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "mix_datasets.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.fixture
def lists(tmp_path):
    l1 = tmp_path / "papers.txt"
    l1.write_text("2 /a/x c1\n# comment\n\n6 /a/y c2 extra-field\n")          # 0.25, 0.75 within
    l2 = tmp_path / "dolma.txt"
    l2.write_text("1 /b/z c3\n1 /b/w c3\n   \n2.0 /b/v_text_document c4\n")  # 0.25, 0.25, 0.5 within
    return str(l1), str(l2)


def test_two_level_normalization(lists):
    r = run("--inputs", "0.9", lists[0], "0.1", lists[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout == ("0.225000 /a/x c1\n0.675000 /a/y c2\n"
                        "0.025000 /b/z c3\n0.025000 /b/w c3\n0.050000 /b/v_text_document c4\n")
    # global weights are normalized too (3:1), and "--input" works as in ALCF/notes/cpt.md
    r = run("--input", "3", lists[0], "1", lists[1])
    assert r.returncode == 0, r.stderr
    weights = [float(line.split()[0]) for line in r.stdout.splitlines()]
    assert weights == [0.1875, 0.5625, 0.0625, 0.0625, 0.125]
    assert sum(weights) == pytest.approx(1.0)


def test_single_list_and_rounding(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("1 /p/a c\n2 /p/b c\n99997 /p/c c\n")
    r = run("--inputs", "5", str(lst))
    assert r.returncode == 0
    assert r.stdout.splitlines() == ["0.000010 /p/a c", "0.000020 /p/b c", "0.999970 /p/c c"]


@pytest.mark.parametrize("make_args, message", [
    (lambda l1, l2: ["0.9", l1, "0.1"], "pairs 'WEIGHT LIST', got 3 values"),
    (lambda l1, l2: ["x", l1], "global weight 'x'"),
    (lambda l1, l2: ["0", l1], "global weight 0 for"),
    (lambda l1, l2: ["-1", l1, "1", l2], "global weight -1 for"),
    (lambda l1, l2: ["1", l1 + ".missing"], "data file list not found: .*missing"),
    (lambda l1, l2: ["1", l2 + ".bad2col"], r"bad2col:2: expected .* got 1"),
    (lambda l1, l2: ["1", l2 + ".zero"], r"zero:1: weight 0 must be > 0"),
    (lambda l1, l2: ["1", l2 + ".word"], r"word:1: weight 'w' is not a number"),
])
def test_errors_are_one_line(lists, make_args, message):
    l1, l2 = lists
    with open(l2 + ".bad2col", "w") as f:
        f.write("1 /a c\n0.5\n")
    with open(l2 + ".zero", "w") as f:
        f.write("0 /a c\n")
    with open(l2 + ".word", "w") as f:
        f.write("w /a c\n")
    r = run("--inputs", *make_args(l1, l2))
    assert r.returncode == 1 and r.stdout == ""
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert re.search(message, r.stderr), r.stderr


def test_missing_inputs_is_a_usage_error():
    r = run()
    assert r.returncode == 2 and "--inputs" in r.stderr and "Traceback" not in r.stderr


def test_tiny_weights_keep_precision(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("1 /p/a c\n3 /p/b c\n9999996 /p/c c\n")  # 1e-7, 3e-7 would print 0.000000
    r = run("--inputs", "1", str(lst))
    assert r.returncode == 0
    assert r.stdout.splitlines() == ["0.000000100 /p/a c", "0.000000300 /p/b c", "1.000000 /p/c c"]


def write_idx(prefix, doc_lengths):
    from megatron.data.indexed_dataset import IndexedDatasetBuilder
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype="uint16")
    for n in doc_lengths:
        b.add_document(list(range(n)))
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


def test_check_and_summary(tmp_path):
    (tmp_path / "books").mkdir()
    a = write_idx(tmp_path / "books" / "a", [10, 20])
    b = write_idx(tmp_path / "b", [100])
    lst = tmp_path / "l.txt"
    lst.write_text(f"1 {a}\n3 {b} web\n")  # 2-column line: corpus "books" from the directory
    r = run("--inputs", "1", str(lst), "--check", "--summary", "--train-tokens", "1000")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"0.250000 {a} books\n0.750000 {b} web\n"
    err = r.stderr.splitlines()
    assert "1 line(s) have 2 fields" in err[0] and err[0].startswith("mix_datasets.py: warning:")
    table = [line.split() for line in err[1:]]
    assert table[0] == ["corpus", "files", "weight", "tokens", "epochs"]
    # books: 30 tokens, 0.25 * 1000 / 30 = 8.333 epochs; web: 100 tokens, 0.75 * 1000 / 100 = 7.5
    assert table[1] == ["books", "1", "0.250000", "30", "8.333"]
    assert table[2] == ["web", "1", "0.750000", "100", "7.500"]
    assert table[3] == ["total", "2", "1.000000"]
    lst.write_text(f"1 {a} books\n1 {tmp_path}/gone web\n")
    r = run("--inputs", "1", str(lst), "--check")
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"2 dataset file(s) not found: {tmp_path}/gone.bin, {tmp_path}/gone.idx" in r.stderr
    r = run("--inputs", "1", str(lst), "--summary")  # no --check: a missing file shows '-' tokens
    assert r.returncode == 0 and r.stderr.splitlines()[2].split() == ["web", "1", "0.500000", "-"]
