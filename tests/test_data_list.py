"""DATA_FILE_LIST parsing and validation."""
import os

import pytest

from megatron.data.data_list import DataListError, DataSource, parse_data_file_list, validate_sources


def write(path, text):
    path.write_text(text)
    return str(path)


def test_parse_alcf_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lst = write(tmp_path / "l.txt",
                "0.0018520780893211373 /flare/dolma/algebraic-stack-train-0000_text_document algebraic\n"
                "\n   \n"
                "# a comment line\n"
                "  2\trel/dir/wiki_text_document.bin   wiki  \n"
                "0 /abs/zero corpusz\n")
    got = parse_data_file_list(lst)
    assert got == [DataSource(0.0018520780893211373, "/flare/dolma/algebraic-stack-train-0000_text_document",
                              "algebraic"),
                   DataSource(2.0, os.path.join(str(tmp_path), "rel/dir/wiki_text_document"), "wiki"),
                   DataSource(0.0, "/abs/zero", "corpusz")]
    assert [s.lineno for s in got] == [1, 5, 6]
    assert got[1].where == f"{lst}:5"


@pytest.mark.parametrize("text, message", [
    ("1.0 /a c\n0.5\n", r"l\.txt:2: expected 3 fields .* got 1"),
    ("1.0 /a c extra\n", r"l\.txt:1: expected 3 fields .* got 4"),
    ("one /a c\n", r"l\.txt:1: weight 'one' is not a number"),
    ("1 /a c\n-0.5 /b c\n", r"l\.txt:2: weight -0.5 is negative"),
    ("nan /a c\n", r"l\.txt:1: weight 'nan' is not finite"),
    ("0 /a c\n0.0 /b c\n", r"l\.txt: all weights are zero"),
    ("# only a comment\n\n", r"l\.txt: no datasets listed \(the list is empty\)"),
    ("", r"l\.txt: no datasets listed"),
])
def test_bad_lists_name_file_and_line(tmp_path, text, message):
    lst = write(tmp_path / "l.txt", text)
    with pytest.raises(DataListError, match=message) as e:
        parse_data_file_list(lst)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_missing_list_file(tmp_path):
    with pytest.raises(DataListError, match="data file list not found: .*nope.txt"):
        parse_data_file_list(str(tmp_path / "nope.txt"))


def test_validate_sources_lists_missing_files(tmp_path):
    (tmp_path / "ok.bin").write_bytes(b"")
    (tmp_path / "ok.idx").write_bytes(b"")
    (tmp_path / "half.bin").write_bytes(b"")
    validate_sources([DataSource(1.0, str(tmp_path / "ok"), "c")])  # no error
    lst = write(tmp_path / "l.txt", f"1 {tmp_path}/ok c\n1 {tmp_path}/half c\n")
    with pytest.raises(DataListError) as e:
        validate_sources(parse_data_file_list(lst))
    msg = str(e.value)
    assert msg.startswith("1 dataset file(s) not found: ") and f"{tmp_path}/half.idx ({lst}:2)" in msg
    many = [DataSource(1.0, str(tmp_path / f"m{i}"), "c") for i in range(7)]  # 14 missing files
    with pytest.raises(DataListError) as e:
        validate_sources(many)
    msg = str(e.value)
    assert msg.startswith("14 dataset file(s) not found") and msg.endswith(" and 4 more")
    assert msg.count(".bin") + msg.count(".idx") == 10


def test_two_column_lines_take_the_parent_directory_as_corpus(tmp_path, caplog):
    # as ALCF's dolma_v1_7_file_list.txt: "<weight> <path>" lines
    lst = write(tmp_path / "l.txt", "0.5 /data/dolma/books/books-0000_text_document\n"
                                    "1.5 /data/dolma/c4/c4-0001_text_document.bin\n"
                                    "1 /data/x/y_text_document wiki\n")
    with caplog.at_level("WARNING", logger="megatron.data.data_list"):
        got = parse_data_file_list(lst)
    assert [(s.weight, s.prefix, s.corpus) for s in got] == [
        (0.5, "/data/dolma/books/books-0000_text_document", "books"),
        (1.5, "/data/dolma/c4/c4-0001_text_document", "c4"),
        (1.0, "/data/x/y_text_document", "wiki")]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "2 line(s) have 2 fields" in warnings[0] and "line 1" in warnings[0]


def test_prefix_listed_twice_warns_and_is_kept(tmp_path, caplog):
    lst = write(tmp_path / "l.txt", "1 /d/a c\n2 /d/b c\n3 /d/a.bin c\n")
    with caplog.at_level("WARNING", logger="megatron.data.data_list"):
        got = parse_data_file_list(lst)
    assert [s.weight for s in got] == [1.0, 2.0, 3.0]
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg == f"{lst}:3: prefix /d/a is already listed at line 1; it is used twice (weights add up)"
