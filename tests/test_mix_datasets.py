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
    (lambda l1, l2: ["1", l2 + ".bad2col"], r"bad2col:2: expected .* got 2 field"),
    (lambda l1, l2: ["1", l2 + ".zero"], r"zero:1: weight 0 must be > 0"),
    (lambda l1, l2: ["1", l2 + ".word"], r"word:1: weight 'w' is not a number"),
])
def test_errors_are_one_line(lists, make_args, message):
    l1, l2 = lists
    with open(l2 + ".bad2col", "w") as f:
        f.write("1 /a c\n0.5 /dolma_v1_7/file\n")
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
