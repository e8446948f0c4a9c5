"""End-of-run summaries stay readable at 80 columns and in a log: no line wider than the console, no cell cut to
"…", every number in full, and a multi-stage run's examples shown once.

One real five-stage run (pretrain, SFT, GRPO, rejection sampling + SFT, distillation from the pretrain stage) is
trained once for the module through ``dsk distill`` in a pipe at ``COLUMNS=80``; the tests render its
``summary.json`` with the real printing functions into an 80-column console.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from dsk.testing import run_dsk
from tests.e2e.test_post_training import MODEL

pytestmark = [pytest.mark.xdist_group("summary_width")]

# An R1-like pipeline, each stage cut to a couple of steps; the stage and trainer names are the long real ones.
PIPELINE = (
    MODEL
    + """\

[[stages]]
name = "pretrain"
[stages.trainer]
type = "pretrain"
steps = 3
batch_size = 8
seq_len = 24
eval_samples = 5
eval_max_new_tokens = 6

[[stages]]
name = "cold_start"
[stages.trainer]
type = "sft"
steps = 2
batch_size = 8
seq_len = 24
eval_samples = 5
eval_max_new_tokens = 6

[[stages]]
name = "reason"
[stages.trainer]
type = "grpo"
steps = 2
prompts_per_step = 4
num_generations = 4
micro_batch_size = 16
max_completion_length = 6
eval_samples = 5
[stages.trainer.rewards.accuracy]
[stages.trainer.rewards.format]
require_think = false

[[stages]]
name = "rejection"
[stages.trainer]
type = "rejection_sampling"
num_prompts = 8
samples_per_prompt = 2
max_completion_length = 6
threshold = 0.0
mix_count = 4
steps = 2
batch_size = 8
seq_len = 24
eval_samples = 5
eval_max_new_tokens = 6
[stages.trainer.mix_task]
type = "modular"
modulus = 7
trace = false
[stages.trainer.rewards.accuracy]

[[stages]]
name = "distill"
[stages.trainer]
type = "distill"
teacher = "{teacher}"
num_prompts = 8
samples_per_prompt = 2
max_completion_length = 16
threshold = 0.0
steps = 2
batch_size = 8
seq_len = 24
eval_samples = 5
eval_max_new_tokens = 6
[stages.trainer.rewards.accuracy]

[optimizer]
lr = 1e-2
"""
)

WIDTH = 80


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """``(summary, CLI output)`` of the five-stage run, run by ``dsk distill`` in a pipe at 80 columns."""
    root = tmp_path_factory.mktemp("summary_width")
    run_dir = root / "run"
    recipe = root / "pipeline.toml"
    recipe.write_text(PIPELINE.replace("{teacher}", str(run_dir / "stages" / "pretrain")), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", str(WIDTH))  # what a terminal of 80 columns, or a log, gives rich
        result = run_dsk(["distill", str(recipe), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, result.stdout, run_dir


def render(renderable_or_print, width: int = WIDTH) -> str:
    """What a console of ``width`` columns writing to a file (a log: no terminal) shows."""
    from rich.console import Console

    out = io.StringIO()
    console = Console(width=width, file=out, soft_wrap=True, highlight=False, color_system=None)
    if callable(renderable_or_print):
        renderable_or_print(console)
    else:
        console.print(renderable_or_print, soft_wrap=False)
    return out.getvalue()


def assert_readable(text: str, width: int = WIDTH) -> None:
    from rich.cells import cell_len

    lines = text.splitlines()
    assert lines
    widest = max(lines, key=cell_len)
    assert cell_len(widest) <= width, widest
    assert "…" not in text, text


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def test_the_train_summary_of_a_pipeline_fits_80_columns_with_every_number_in_full(pipeline):
    from dsk.train.progress import summary_table

    summary, _, _ = pipeline
    stages = summary["stages"]
    assert [st["stage"] for st in stages] == ["pretrain", "cold_start", "reason", "rejection", "distill"]
    text = render(summary_table(summary))
    assert_readable(text)
    assert text.startswith("dsk train: completed")
    labels = ["trainer", "step", "loss", "tok/s", "accuracy", "skipped", "time"]
    for st in stages:
        labels += [label for _, label, _ in st["columns"]]  # the trainers' own numbers: maxvio, reward
        for value in (
            st["stage"],
            st["trainer"],  # "rejection_sampling" was cut to "rejection_samp…" at 80 columns
            f"{st['step']}/{st['steps']}",
            fmt(st["final_loss"], ".4f"),
            fmt(st["tokens_per_s"], ",.0f"),
            f"{100 * st['eval/accuracy']:.1f}%",
            *(fmt(st.get(key), spec) for key, _, spec in st["columns"]),
            f"{st['wall_s']:.0f}s",
        ):
            assert value in text, (value, text)
    for label in set(labels):
        assert label in text, (label, text)


def test_a_summary_that_fits_stays_one_row_per_stage(pipeline):
    from dsk.train.progress import summary_table

    summary, _, _ = pipeline
    text = render(summary_table(summary), width=200)
    assert_readable(text, 200)
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == len(summary["stages"])  # the wide form: one row per stage
    for row, st in zip(rows, summary["stages"], strict=True):
        assert st["stage"] in row and st["trainer"] in row


def test_the_distill_summary_fits_80_columns_in_the_command_output(pipeline):
    from dsk_rl.cli import _table

    summary, output, _ = pipeline
    st = summary["stages"][-1]
    assert st["trainer"] == "distill" and st["traces"] > 0
    # the table in the command's own output (a pipe at COLUMNS=80; the progress messages before it name paths),
    # and the table alone
    printed = output[output.index("dsk distill: completed") : output.index("run directory:")]
    for text in (printed, render(_table(summary))):
        assert_readable(text)
        for value in (
            "teacher params",
            "student params",
            "student/teacher",
            f"{st['teacher/parameters']:,}",
            f"{st['student/parameters']:,}",
            f"{100 * st['teacher/eval/accuracy']:.1f}%",
            f"{100 * st['eval/accuracy']:.1f}%",
            str(st["traces"]),
            st["mode"],
        ):
            assert value in text, (value, text)


def test_a_pipeline_prints_its_examples_once_and_wrapped(pipeline):
    from dsk.train.progress import print_summary

    summary, _, run_dir = pipeline
    assert len(summary["examples"]) == 5  # summary.json keeps every stage's examples
    final = summary["examples"]["distill"]
    assert final
    long_row = {"prompt": "(1+2)%5=", "completion": "<answer>3</answer> " * 8, "correct": True}
    summary = {**summary, "examples": {**summary["examples"], "distill": [*final, long_row]}}
    text = render(lambda console: print_summary(console, summary, Path(run_dir)))
    path_line = f"run directory: {run_dir}"
    assert text.endswith(path_line + "\n")  # a path is never broken: it stays copyable
    assert_readable(text[: -len(path_line) - 1])
    marks = [line for line in text.splitlines() if line.startswith(("  ✓", "  ✗"))]
    assert len(marks) == len(final) + 1  # the last stage's examples only, not 5 stages' worth
    assert text.count("examples of stage") == 1 and "examples of stage distill:" in text
    assert all(line == line.rstrip() for line in text.splitlines())  # no padding to the width in a log
    acc = summary["eval/accuracy"]
    assert f"held-out greedy accuracy {100 * acc:.1f}% on {summary['stages'][-1]['eval/samples']} test problems" in text
