"""``dsk train``, and :func:`execute`, which runs a validated recipe for it and for the run
commands that plugins add (see :mod:`dsk.api.cli`)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from dsk.cli.common import (
    DskUsageError,
    echo_json,
    escape,
    load_and_validate,
    nproc_option,
    run_options,
    stderr_console,
    stdout_console,
)
from dsk.errors import InputError


def _save_delay() -> tuple[float, int]:
    """The kill-during-save test hook, read here at the CLI edge only.

    ``DSK_DEBUG_SAVE_DELAY=SECONDS`` or ``SECONDS:FROM_STEP``: sleep that long inside every checkpoint save (of step
    FROM_STEP or later) between writing the files and the rename, so that a test can kill the process there.
    """
    from dsk.train.runner import SAVE_DELAY_ENV

    raw = os.environ.get(SAVE_DELAY_ENV, "").strip()
    if not raw:
        return 0.0, 0
    seconds, _, from_step = raw.partition(":")
    try:
        return max(0.0, float(seconds)), int(from_step or 0)
    except ValueError:
        raise DskUsageError(f"{SAVE_DELAY_ENV}={raw!r}: expected SECONDS or SECONDS:FROM_STEP") from None


def _dry_run(result: Any, recipe: str, run_dir: Path, as_json: bool) -> None:
    from dsk.recipe.dump import resolved_to_table
    from dsk.train.runner import plan_stages, resolved_toml

    plans = plan_stages(result, run_dir)
    stages = []
    for p in plans:
        trainer = p.sections.get("trainer")
        stages.append(
            {
                "stage": p.name,
                "dir": str(p.dir),
                "trainer": getattr(trainer, "name", None),
                "steps": getattr(getattr(trainer, "config", None), "steps", None),
            }
        )
    if as_json:
        echo_json(
            {"recipe": recipe, "valid": True, "run_dir": str(run_dir), "stages": stages,
             "resolved": resolved_to_table(result.resolved)}
        )  # fmt: skip
        return
    console = stdout_console()
    console.print(f"[green]recipe ok[/]: would train into {escape(str(run_dir))} (dry run: nothing written)")
    for s in stages:
        console.print(
            f"  stage {escape(str(s['stage'] or '-'))}: {s['trainer']} for {s['steps']} steps -> {escape(s['dir'])}"
        )
    console.print("")
    click.echo(resolved_toml(result), nl=False)


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@run_options
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint of --run-dir.")
@click.option("--stage", help="Run only this stage of a [[stages]] pipeline.")
@nproc_option
@click.pass_context
def train(ctx, recipe, configs, sets, unsets, run_dir, dry_run, as_json, resume, stage, nproc) -> None:
    """Train from a recipe (one stage or a [[stages]] pipeline).

    Writes a run directory (default runs/<recipe>-<time>) with resolved.toml, metrics.jsonl, checkpoints/step-N/
    and summary.json. Ctrl-C saves a checkpoint and exits (code 130); --resume continues it exactly.

    \b
    Examples:
      dsk train recipes/quickstart.toml --run-dir runs/quickstart
      dsk train recipes/quickstart.toml --run-dir runs/quickstart --resume
      dsk train recipes/quickstart.toml --set trainer.steps=50 --set model.ffn.router.type=aux_loss --json
      dsk train recipes/quickstart.toml --nproc 2 --set parallel.expert.type=node_limited
    """
    result = load_and_validate(ctx, recipe, configs, sets, unsets, require=("model", "trainer"))
    done = execute(ctx, result, recipe, run_dir, resume, stage, dry_run, as_json, nproc=nproc)
    if done is None:
        return
    summary, console, run_path = done
    from dsk.train.progress import print_summary

    print_summary(console, summary, run_path)


def _launch(ctx: click.Context, result: Any, run_path: Path, resume: bool, stage: str | None, nproc: int,
            given_run_dir: str | None) -> None:  # fmt: skip
    """``--nproc N`` in the launching process: check the run directory, then start the ranks and wait for them."""
    from dsk.cli import common
    from dsk.train.distributed import launch
    from dsk.train.runner import RESOLVED, prepare_run_dir

    # a layout the process count cannot hold fails here, with exit 2, before any process starts
    common.check_launch(ctx, result, nproc, f"--nproc {nproc}")
    if not (resume and not (run_path / RESOLVED).exists()):
        try:  # bad options fail here, with exit 2, before any process starts
            prepare_run_dir(result, run_path, resume=resume, stage=stage, write=False)
        except InputError as exc:
            raise DskUsageError.from_input_error(exc) from None
    argv = _without_nproc(list(common.INVOCATION_ARGV if common.INVOCATION_ARGV is not None else sys.argv[1:]))
    if given_run_dir is None:  # every rank must use the same directory, not one stamped with its own clock
        argv += ["--run-dir", str(run_path)]
    code = launch(nproc, argv, console=stderr_console())
    if code:
        raise SystemExit(code)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def execute(
    ctx: click.Context,
    result: Any,
    recipe: str,
    run_dir: str | None,
    resume: bool,
    stage: str | None,
    dry_run: bool,
    as_json: bool,
    nproc: int = 1,
) -> tuple[dict[str, Any], Any, Path] | None:
    """Run a validated recipe into a run directory (the shared part of ``dsk train`` and the plugin run commands).

    Args:
        ctx: the command's click context (its root holds the plugin manager and registry).
        result: what :func:`dsk.cli.common.load_and_validate` returned.
        recipe: the recipe path, as given on the command line.
        run_dir: ``--run-dir`` (None: ``runs/<recipe>-<time>``).
        resume: ``--resume``: continue the latest checkpoint of ``run_dir``.
        stage: ``--stage``: run only this stage of a ``[[stages]]`` pipeline (None: all).
        dry_run: ``--dry-run``: print the plan and the resolved recipe, write nothing.
        as_json: ``--json``: the summary goes to stdout as JSON, progress to stderr.
        nproc: ``--nproc``: more than 1 re-runs this command on that many local ranks (torch's launcher) and
            waits for them; rank 0 prints and writes.

    Exits 2 on bad input (also found mid-run: a data row, a checkpoint), 1 when the run failed, 128 + the signal
    when interrupted. Returns ``(summary, console, run_path)`` for the caller to print, or None when nothing is
    left to print (a dry run, or ``--json``, whose summary has been written to stdout).
    """
    from dsk.train.context import launch_rank
    from dsk.train.distributed import distributed_env
    from dsk.train.runner import default_run_dir

    if resume and not run_dir:
        raise DskUsageError("--resume needs --run-dir DIR: the run directory to continue")
    if run_dir:
        run_path = Path(run_dir)
    elif distributed_env() and os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun: one name on every rank
        run_path = Path("runs") / f"{Path(recipe).stem}-{os.environ['TORCHELASTIC_RUN_ID']}"
    else:
        run_path = default_run_dir(recipe)
    if dry_run:
        if launch_rank() == 0:
            _dry_run(result, recipe, run_path, as_json)
        return None
    if nproc > 1 and not distributed_env():
        _launch(ctx, result, run_path, resume, stage, nproc, run_dir)
        return None
    console = stderr_console() if as_json else stdout_console()
    command = f"dsk {ctx.info_name or 'train'}"  # the command to repeat with --resume
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and os.environ.get("LOCAL_WORLD_SIZE") == str(world):  # one machine: the same --nproc
        command += f" --nproc {world}"
    summary = _run(ctx.find_root().obj, result, recipe, run_path, resume, stage, console, _save_delay(), command)
    if launch_rank() != 0:  # rank 0 prints the summary of a multi-process run
        return None
    if as_json:
        echo_json(summary)
        return None
    return summary, console, run_path


def _run(app: Any, result: Any, recipe: str, run_path: Path, resume: bool, stage: str | None, console: Any,
         save_delay: tuple[float, int], command: str) -> dict[str, Any]:  # fmt: skip
    """Run the recipe; map the run's exceptions onto exit codes (2 bad input, 1 failed, 130/143 interrupted)."""
    from dsk.errors import InputError
    from dsk.train.context import RunFailed, RunInterrupted, launch_rank
    from dsk.train.progress import Reporter
    from dsk.train.runner import run_recipe

    log_cfg = result.resolved.get("logging")
    reporter = Reporter(console, enabled=getattr(log_cfg, "progress", True))
    err = stderr_console()
    try:
        return run_recipe(
            result,
            registry=app.registry(),
            pm=app.plugin_manager(),
            run_dir=run_path,
            recipe_path=recipe,
            resume=resume,
            stage=stage,
            reporter=reporter,
            save_delay=save_delay[0],
            save_delay_from_step=save_delay[1],
        )
    except InputError as exc:
        # bad input, wherever the run met it (setup, a data row read mid-run, a checkpoint that does not load):
        # one line, exit 2; what the run wrote before (checkpoints, metrics rows) stays as it is
        reporter.stop()
        raise DskUsageError.from_input_error(exc) from None
    except RunFailed as exc:
        reporter.stop()
        if launch_rank() != 0:
            raise SystemExit(1) from None
        err.print(f"[bold red]Run failed:[/] {escape(str(exc))}")
        raise SystemExit(1) from None
    except RunInterrupted as exc:
        reporter.stop()
        if launch_rank() != 0:  # rank 0 says it for the run
            raise SystemExit(128 + exc.signum) from None
        err.print(f"[yellow]Interrupted:[/] {escape(str(exc))}. Continue with: {escape(command)} {escape(recipe)} "
                  f"--run-dir {escape(str(run_path))} --resume")  # fmt: skip
        raise SystemExit(128 + exc.signum) from None
    except KeyboardInterrupt:
        reporter.stop()
        err.print("[yellow]Aborted[/] by a second interrupt, without saving; the previous checkpoint is intact.")
        raise SystemExit(128 + signal.SIGINT) from None
