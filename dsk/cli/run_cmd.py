"""``dsk train``, ``dsk distill`` and ``dsk profile``."""

from __future__ import annotations

import click

from dsk.cli.common import echo_json, load_and_validate, run_options, stdout_console


def _not_built(ctx: click.Context, command: str, recipe: str, configs, sets, unsets, as_json: bool, issue: str) -> None:
    result = load_and_validate(ctx, recipe, configs, sets, unsets, require=("model",))
    message = f"the recipe is valid, but `dsk {command}` is not built yet ({issue})"
    if as_json:
        echo_json({"recipe": recipe, "valid": True, "built": False, "message": message})
    else:
        stdout_console().print(f"[green]recipe ok[/] ({len(result.stages) or 1} stage(s)); {message}")
    ctx.exit(1)


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@run_options
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint of --run-dir.")
@click.option("--stage", help="Run only this stage of a [[stages]] pipeline.")
@click.pass_context
def train(ctx, recipe, configs, sets, unsets, run_dir, dry_run, as_json, resume, stage) -> None:
    """Train from a recipe (one stage or a [[stages]] pipeline)."""
    _not_built(ctx, "train", recipe, configs, sets, unsets, as_json, "the training runtime lands with issue 4")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@run_options
@click.pass_context
def distill(ctx, recipe, configs, sets, unsets, run_dir, dry_run, as_json) -> None:
    """Teacher -> reasoning traces -> student."""
    _not_built(ctx, "distill", recipe, configs, sets, unsets, as_json, "distillation lands with issue 5")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@run_options
@click.pass_context
def profile(ctx, recipe, configs, sets, unsets, run_dir, dry_run, as_json) -> None:
    """Measure time, memory, FLOPs and expert load of a recipe."""
    _not_built(ctx, "profile", recipe, configs, sets, unsets, as_json, "profiling is not built yet")
