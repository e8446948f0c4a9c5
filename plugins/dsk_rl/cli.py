"""``dsk distill``: a teacher checkpoint writes verified reasoning traces, a smaller student learns them.

The command runs a recipe whose ``[trainer]`` (or one of whose ``[[stages]]``) is ``type = "distill"`` through the
same build path as ``dsk train`` (run directory, checkpoints, ``--resume``), then prints teacher against student.
Registered by :func:`dsk_rl.plugin.register_commands`; torch-free at import, like every command, so ``dsk --help``
can list it.
"""

from __future__ import annotations

import json
from typing import Any

import click

from dsk.api.cli import (
    DskUsageError,
    FittedTable,
    add_override,
    escape,
    execute,
    load_and_validate,
    load_recipe_data,
    nproc_option,
    run_options,
)

__all__ = ["distill"]


def _distill_stages(result: Any) -> list[str | None]:
    """Names of the stages that distill (None for a single-stage recipe)."""
    if result.stages:
        return [name for name, sections in result.stages if getattr(sections.get("trainer"), "name", None) == "distill"]
    trainer = result.resolved.get("trainer")
    return [None] if getattr(trainer, "name", None) == "distill" else []


def _teacher_keys(data: dict[str, Any] | None) -> list[str]:
    """Where ``--teacher`` goes: ``trainer.teacher``, or ``stages.<i>.trainer.teacher`` of every distill stage."""
    stages = (data or {}).get("stages")
    if not isinstance(stages, list):
        return ["trainer.teacher"]  # also for a recipe that does not load: validation reports it
    keys = [
        f"stages.{i}.trainer.teacher"
        for i, stage in enumerate(stages)
        if isinstance(stage, dict)
        and isinstance(stage.get("trainer"), dict)
        and stage["trainer"].get("type") == "distill"
    ]
    return keys or ["trainer.teacher"]


def _table(summary: dict[str, Any]) -> FittedTable:
    """Teacher against student, one row per distill stage (one row per number when that is too wide)."""

    def pct(value: Any) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    rows = [
        [
            st.get("stage") or "-",
            str(st.get("mode", "-")),
            str(st.get("traces", "-")),
            f"{st.get('teacher/parameters', 0):,}",
            f"{st.get('student/parameters', 0):,}",
            pct(st.get("teacher/eval/accuracy")),
            pct(st.get("eval/accuracy")),
            pct(st.get("student/teacher_accuracy_ratio")),
            f"{st.get('wall_s', 0):.1f}s",
        ]
        for st in summary.get("stages", [])
        if st.get("trainer") == "distill"
    ]
    columns = ["stage", "mode", "traces", "teacher params", "student params", "teacher acc", "student acc",
               "student/teacher", "time"]  # fmt: skip
    return FittedTable(f"dsk distill: {summary.get('status', '?')}", columns, rows, left=("stage", "mode"))


@click.command(short_help="Teacher -> reasoning traces -> student.")
@click.argument("recipe", type=click.Path(dir_okay=False))
@run_options
@click.option("--teacher", metavar="CKPT", help="Teacher checkpoint directory (sets trainer.teacher).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint of --run-dir.")
@click.option("--stage", help="Run only this stage of a [[stages]] pipeline.")
@nproc_option
@click.pass_context
def distill(ctx, recipe, configs, sets, unsets, run_dir, dry_run, as_json, teacher, resume, stage, nproc) -> None:
    """Teacher -> verified reasoning traces -> student (R1-Distill).

    The recipe's [model] is the student; [trainer] type = "distill" names the teacher checkpoint, how many traces
    to sample and keep, and how the student learns them (mode = "sequence": SFT; "logit": SFT + forward KL to the
    teacher's next-token distribution).

    \b
    Examples:
      dsk distill recipes/distill.toml --teacher runs/r1/stages/final --run-dir runs/distill
      dsk distill recipes/distill.toml --teacher runs/r1/stages/final --set trainer.mode=logit --json
    """
    if teacher is not None:
        # the command line's --set/--unset keep their order; the teacher option applies last
        for key in _teacher_keys(load_recipe_data(ctx, recipe, configs, sets, unsets)):
            sets = add_override(ctx, sets, f"{key}={json.dumps(str(teacher))}")
    result = load_and_validate(ctx, recipe, configs, sets, unsets, require=("model", "trainer"))
    if not _distill_stages(result):
        raise DskUsageError(
            f'{recipe}: no [trainer] with type = "distill"; dsk distill runs distillation recipes '
            "(use dsk train for the others)"
        )
    done = execute(ctx, result, recipe, run_dir, resume, stage, dry_run, as_json, nproc=nproc)
    if done is None:
        return
    summary, console, run_path = done
    console.print(_table(summary), soft_wrap=False)  # the console's width (80 in a log): it fits
    console.print(f"run directory: {escape(str(run_path))}")
