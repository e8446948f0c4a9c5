"""JSONL files as a task: deterministic shuffled sampling, disjoint held-out rows, answer checking."""

import json

import pytest
from dsk_tasks.config import JsonlConfig
from dsk_tasks.jsonl import JsonlTask
from pydantic import ValidationError


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": f"{i}+{i}=", "completion": f"<answer>{2 * i}</answer>", "answer": str(2 * i)} for i in range(200)
    ]
    rows.append(dict(rows[0]))  # a duplicate row must land in the same split as its twin
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_sampling_is_deterministic_and_covers_each_row_once_per_epoch(sft_file):
    task = JsonlTask(JsonlConfig(path=str(sft_file), seed=3))
    n = len(task)
    first = [task.sample("train", i)["prompt"] for i in range(n)]
    second = [task.sample("train", i)["prompt"] for i in range(n, 2 * n)]
    assert sorted(first) == sorted(second) and first != second
    assert [JsonlTask(JsonlConfig(path=str(sft_file), seed=3)).sample("train", i) for i in range(5)] == [
        task.sample("train", i) for i in range(5)
    ]


def test_held_out_rows_never_appear_in_train(sft_file):
    task = JsonlTask(JsonlConfig(path=str(sft_file), test_percent=20))
    train = {r["prompt"] for r in task.records("train")}
    test = {r["prompt"] for r in task.records("test")}
    assert 10 < len(test) < 80 and not train & test
    assert len(task.records("train")) + len(task.records("test")) == 201


def test_separate_test_file_and_test_size(sft_file, tmp_path):
    task = JsonlTask(JsonlConfig(path=str(sft_file), test_path=str(sft_file), test_size=7))
    assert len(task.records("test")) == 7
    assert len(task.records("test", 50)) == 7  # a test set never repeats a row
    assert len(task.records("train", 500)) == 500  # training records run over epochs


def test_check_compares_the_answer_column(sft_file):
    task = JsonlTask(JsonlConfig(path=str(sft_file)))
    record = task.sample("train", 0)
    assert task.check(record, record["completion"])
    assert not task.check(record, "<answer>-1</answer>")
    assert not task.check(record, record["answer"])
    assert JsonlTask(JsonlConfig(path=str(sft_file), require_format=False)).check(record, record["answer"])
    with pytest.raises(ValueError, match="no 'answer' column"):
        task.check({"prompt": "p", "completion": "c"}, "x")


def test_no_test_split_is_an_error_when_asked_for(sft_file):
    with pytest.raises(ValueError, match="no test rows"):
        JsonlTask(JsonlConfig(path=str(sft_file))).sample("test", 0)


def test_file_errors_surface_when_the_task_is_built(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing key 'text'"):
        JsonlTask(JsonlConfig(path=str(path)))


def test_two_test_split_definitions_are_refused():
    with pytest.raises(ValidationError, match="set one"):
        JsonlConfig(path="a.jsonl", test_path="b.jsonl", test_percent=10)
