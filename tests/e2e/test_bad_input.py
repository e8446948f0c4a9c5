"""Bad input met while building or running a recipe ends in exit 2 with the file (and line), never a traceback.

A malformed JSONL row, a tokenizer file that is not there, an init checkpoint that does not load (a teacher, a
policy's ``init_checkpoint``, the previous stage's checkpoint on ``--resume``), and a bad row that a streaming data
source meets only in the middle of the run: each is the user's to fix, so each is one line on stderr and exit 2,
and what the run wrote before it (checkpoints, metrics) is left as it was. Runs are 2-3 steps of the quickstart
model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from dsk import hookimpl
from dsk.api import BaseConfig
from dsk.api.runtime import iter_jsonl
from dsk.testing import isolated_plugin_manager, run_dsk

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.toml"

# The quickstart model and task, cut to a few small steps with a checkpoint after each.
SHORT = f"""\
[dsk]
extends = ["{QUICKSTART}"]

[trainer]
steps = 2
batch_size = 8
eval_samples = 0

[checkpoint]
every = 1
keep = 3

[logging]
progress = false
"""

DISTILL = f"""\
[dsk]
extends = ["{QUICKSTART}"]

[trainer]
type = "distill"
num_prompts = 4
samples_per_prompt = 1
max_completion_length = 4
steps = 2
batch_size = 4
seq_len = 40
eval_samples = 0

[trainer.rewards.accuracy]

[logging]
progress = false
"""

GRPO = f"""\
[dsk]
extends = ["{QUICKSTART}"]

[trainer]
type = "grpo"
steps = 2
prompts_per_step = 2
num_generations = 2
max_completion_length = 4
eval_samples = 0

[trainer.rewards.accuracy]

[logging]
progress = false
"""

STAGES = f"""\
[dsk]
extends = ["{QUICKSTART}"]

[checkpoint]
every = 1
keep = 3

[logging]
progress = false

[[stages]]
name = "a"
[stages.trainer]
type = "pretrain"
steps = 2
batch_size = 8
eval_samples = 0

[[stages]]
name = "b"
[stages.trainer]
type = "sft"
steps = 2
batch_size = 8
eval_samples = 0
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rows(n: int) -> str:
    return "".join(json.dumps({"text": f"{i}+{i}={2 * i}"}) + "\n" for i in range(n))


def assert_bad_input(result: Any, *named: str) -> None:
    """Exit 2, no exception escaped the CLI, and the one-line error on stderr names each of ``named``."""
    assert result.exception is None, repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "Error:" in result.stderr
    for text in named:
        assert text in result.stderr, (text, result.stderr)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` and its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A good 2-step checkpoint of the quickstart model, written once for the module."""
    root = tmp_path_factory.mktemp("base")
    result = run_dsk(["train", str(write(root / "short.toml", SHORT)), "--run-dir", str(root / "run"), "--json"])
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout)["checkpoint"])


def broken_copy(checkpoint: Path, target: Path, name: str) -> Path:
    """A copy of ``checkpoint`` whose file ``name`` is corrupt (truncated weights, or a JSON file cut short)."""
    shutil.copytree(checkpoint, target)
    damaged = target / name
    damaged.write_bytes(damaged.read_bytes()[:24])
    return damaged


def test_a_malformed_jsonl_line_is_exit_2_naming_file_and_line_in_a_real_process(tmp_path):
    data = write(tmp_path / "data.jsonl", rows(3) + '{"text": "4+4=8"\n' + rows(2))
    recipe = write(tmp_path / "r.toml", SHORT + f'\n[data]\ntype = "jsonl"\npath = "{data}"\n')
    # a real process: what a user sees on the terminal, tracebacks included if there were one
    code = "import sys; from dsk.cli import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, "train", str(recipe), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert f"{data}:4: invalid JSON" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_hf_tokenizer_file_is_exit_2_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-dir" / "tokenizer.json"
    recipe = write(tmp_path / "r.toml", SHORT + f'\n[tokenizer]\ntype = "hf"\npath = "{missing}"\n')
    result = run_dsk(["train", str(recipe), "--run-dir", str(tmp_path / "run")])
    assert_bad_input(result, str(missing))


@pytest.mark.parametrize("command", ["distill", "grpo"])
def test_an_init_checkpoint_that_does_not_load_is_exit_2_naming_it(tmp_path, base_checkpoint, command):
    broken = tmp_path / "broken"
    damaged = broken_copy(base_checkpoint, broken, "model.safetensors")
    if command == "distill":  # the teacher, through the rl plugin's command
        args = ["distill", str(write(tmp_path / "d.toml", DISTILL)), "--teacher", str(broken)]
    else:  # the policy's init_checkpoint, set on the command line
        args = ["train", str(write(tmp_path / "g.toml", GRPO)), "--set", f"trainer.init_checkpoint='{broken}'"]
    result = run_dsk([*args, "--run-dir", str(tmp_path / "run")])
    assert_bad_input(result, str(damaged))


@pytest.mark.parametrize("damaged_file", ["model.safetensors", "state.json"])
def test_a_corrupt_previous_stage_checkpoint_on_resume_is_exit_2_and_leaves_the_run_untouched(tmp_path, damaged_file):
    recipe = write(tmp_path / "stages.toml", STAGES)
    run = tmp_path / "run"
    first = run_dsk(["train", str(recipe), "--run-dir", str(run), "--stage", "a"])
    assert first.exit_code == 0, first.output
    damaged = broken_copy(run / "stages" / "a" / "checkpoints" / "step-2", tmp_path / "spare", damaged_file)
    shutil.copyfile(damaged, run / "stages" / "a" / "checkpoints" / "step-2" / damaged_file)
    before = snapshot(run / "stages" / "a"), (run / "summary.json").read_bytes()
    result = run_dsk(["train", str(recipe), "--run-dir", str(run), "--resume"])
    assert_bad_input(result, str(run / "stages" / "a" / "checkpoints" / "step-2" / damaged_file))
    assert (snapshot(run / "stages" / "a"), (run / "summary.json").read_bytes()) == before
    assert not list((run / "stages").rglob(".tmp-*"))


# ---- a data source that reads its file lazily: the bad row is met in the middle of the run -------------------------
class StreamedConfig(BaseConfig):
    """A JSONL file read row by row as training asks for records."""

    path: str = Field(..., description="the JSONL file")


class StreamedJsonl:
    """Records ``sample("train", i)`` read from the file only when the trainer first asks for them."""

    def __init__(self, config: StreamedConfig):
        self._rows = iter_jsonl(config.path, "text")
        self._seen: list[dict[str, Any]] = []

    def sample(self, split: str, index: int) -> dict[str, Any]:
        while len(self._seen) <= index:
            self._seen.append(next(self._rows))  # a bad row raises DataError here, mid-run
        return self._seen[index]


class StreamedPlugin:
    @hookimpl
    def register_tasks(self, register):
        register("task", "streamed_jsonl", f"{__name__}:StreamedJsonl", config=StreamedConfig, summary="lazy JSONL")


def test_a_bad_row_read_mid_run_is_exit_2_and_keeps_what_was_written(tmp_path):
    from dsk.train.checkpoint import list_checkpoints, load_checkpoint
    from dsk.train.metrics import read_metrics

    # 4 records a step (no packing): steps 1 and 2 read rows 1-8, step 3 reaches the bad line 11
    data = write(tmp_path / "stream.jsonl", rows(10) + "{oops\n" + rows(10))
    recipe = write(tmp_path / "r.toml", SHORT + f'\n[data]\ntype = "streamed_jsonl"\npath = "{data}"\n')
    run = tmp_path / "run"
    args = ["train", str(recipe), "--run-dir", str(run), "--set", "trainer.steps=5", "--set", "trainer.batch_size=4",
            "--set", "trainer.packing=false"]  # fmt: skip
    result = run_dsk(args, pm=isolated_plugin_manager(StreamedPlugin()))
    assert_bad_input(result, f"{data}:11: invalid JSON")
    assert [step for step, _ in list_checkpoints(run)] == [1, 2]
    assert load_checkpoint(run).step == 2
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]


# ---- the CLI edge: bad input from any command, a plugin's included -------------------------------------------------
class ReaderPlugin:
    """A plugin command that reads a JSONL file and does not handle its errors itself."""

    @hookimpl
    def register_commands(self, cli):
        import click

        @click.command("count-rows")
        @click.argument("path")
        def count_rows(path):
            """Count the rows of a JSONL file."""
            click.echo(sum(1 for _ in iter_jsonl(path)))

        cli.add_command(count_rows)


def test_bad_input_raised_inside_any_command_is_exit_2_without_a_traceback(tmp_path):
    data = write(tmp_path / "d.jsonl", rows(2) + "[1]\n")
    result = run_dsk(["count-rows", str(data)], pm=isolated_plugin_manager(ReaderPlugin()))
    assert_bad_input(result, f"{data}:3: expected a JSON object, got list")
    good = run_dsk(
        ["count-rows", str(write(tmp_path / "ok.jsonl", rows(2)))], pm=isolated_plugin_manager(ReaderPlugin())
    )
    assert good.exit_code == 0 and good.stdout.strip() == "2"
