"""JSONL sources: kinds, and errors that name the file and the line."""

import json

import pytest

from dsk.data.jsonl import DataError, JsonlSource, read_jsonl


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_text_and_sft_rows_and_keeps_extra_columns(tmp_path):
    text = write(tmp_path / "pt.jsonl", [json.dumps({"text": "12+34=46"}), "", json.dumps({"text": "1+1=2"})])
    sft = write(tmp_path / "sft.jsonl", [json.dumps({"prompt": "1+1=", "completion": "2", "answer": "2"})])
    assert [r["text"] for r in read_jsonl(text)] == ["12+34=46", "1+1=2"]
    source = JsonlSource(sft)
    assert source.kind == "sft" and len(source) == 1 and source[0]["answer"] == "2"


def test_bad_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", [json.dumps({"text": "a"}), "", '{"text": "b"'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        read_jsonl(path)


def test_missing_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path / "sft.jsonl", [json.dumps({"prompt": "a", "completion": "b"}), json.dumps({"prompt": "c"})])
    with pytest.raises(DataError, match=r"sft\.jsonl:2: missing key 'completion'"):
        read_jsonl(path)


def test_explicit_kind_is_enforced(tmp_path):
    path = write(tmp_path / "pt.jsonl", [json.dumps({"text": "a"})])
    with pytest.raises(DataError, match=r"pt\.jsonl:1: missing key 'prompt'"):
        read_jsonl(path, kind="sft")


def test_non_string_value_and_non_object_row_are_rejected(tmp_path):
    path = write(tmp_path / "x.jsonl", [json.dumps({"text": 3})])
    with pytest.raises(DataError, match=r"x\.jsonl:1: key 'text' must be a string"):
        read_jsonl(path)
    path = write(tmp_path / "y.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"y\.jsonl:1: expected a JSON object"):
        read_jsonl(path)


def test_row_of_unknown_shape_is_rejected(tmp_path):
    path = write(tmp_path / "z.jsonl", [json.dumps({"input": "a"})])
    with pytest.raises(DataError, match=r"z\.jsonl:1: .*expected 'text'"):
        read_jsonl(path)


def test_source_over_several_files_must_share_a_kind(tmp_path):
    a = write(tmp_path / "a.jsonl", [json.dumps({"text": "a"})])
    b = write(tmp_path / "b.jsonl", [json.dumps({"prompt": "p", "completion": "c"})])
    assert len(JsonlSource([a, a])) == 2
    with pytest.raises(DataError, match=r"b\.jsonl:1: missing key 'text'"):
        JsonlSource([a, b])


def test_empty_source_is_an_error(tmp_path):
    path = write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="no rows"):
        JsonlSource(path)


def test_a_missing_file_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"gone\.jsonl: no such JSONL file") as info:
        read_jsonl(tmp_path / "gone.jsonl")
    assert info.value.file == str(tmp_path / "gone.jsonl") and info.value.line is None


def test_bytes_that_are_not_utf8_name_their_own_line(tmp_path):
    # 20 good lines first, so a reader that decodes ahead in chunks would blame line 1
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"".join([json.dumps({"text": f"row {i}"}).encode() + b"\n" for i in range(20)])
                     + '{"text": "caf\xe9"}\n'.encode("latin-1"))  # fmt: skip
    with pytest.raises(DataError, match=r"latin1\.jsonl:21: not UTF-8") as info:
        read_jsonl(path)
    assert info.value.line == 21


def test_data_errors_are_input_errors_with_file_and_line(tmp_path):
    from dsk.errors import InputError

    path = write(tmp_path / "bad.jsonl", [json.dumps({"text": "a"}), "[1, 2]"])
    with pytest.raises(InputError) as info:
        read_jsonl(path)
    assert (info.value.file, info.value.line) == (str(path), 2)
    assert info.value.message == "expected a JSON object, got list"
