"""InputError: bad input says what and where, and every error of bad input in dsk is one."""

import pickle
import subprocess
import sys

import pytest

from dsk.errors import InputError


def test_the_message_leads_with_file_and_line():
    assert str(InputError("invalid JSON", file="data.jsonl", line=3)) == "data.jsonl:3: invalid JSON"
    assert str(InputError("no tokenizer.json here", file="tok")) == "tok: no tokenizer.json here"
    error = InputError("bad value")
    assert str(error) == "bad value" and (error.file, error.line, error.where) == (None, None, "")


def test_file_and_line_survive_pickling():
    error = pickle.loads(pickle.dumps(InputError("invalid JSON", file="d.jsonl", line=7)))
    assert (str(error), error.message, error.file, error.line) == (
        "d.jsonl:7: invalid JSON",
        "invalid JSON",
        "d.jsonl",
        7,
    )


def test_it_is_a_value_error_so_parsers_callers_keep_working():
    with pytest.raises(ValueError):
        raise InputError("x")


@pytest.mark.parametrize(
    "module, name",
    [
        ("dsk.train.context", "RunSetupError"),
        ("dsk.train.checkpoint", "CheckpointLoadError"),
        ("dsk.model.hf", "CheckpointError"),
        ("dsk.data.jsonl", "DataError"),
        ("dsk.data.tokenizers", "TokenizerFileError"),
    ],
)
def test_the_errors_of_bad_input_are_input_errors(module, name):
    import importlib

    assert issubclass(getattr(importlib.import_module(module), name), InputError)


def test_plugins_reach_it_through_the_public_api_without_torch():
    code = (
        "import sys, dsk.api, dsk.api.runtime, dsk.errors; "
        "assert dsk.api.InputError is dsk.api.runtime.InputError is dsk.errors.InputError; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
