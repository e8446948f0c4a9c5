"""``dsk recipe show`` and ``dsk recipe validate``: resolved recipes with provenance, and all problems at once."""

from __future__ import annotations

from typing import Any

import click

from dsk.cli.common import (
    DskUsageError,
    echo_json,
    escape,
    load_and_validate,
    problems_json,
    recipe_options,
    render_problems,
    stderr_console,
    stdout_console,
)


@click.group()
def recipe() -> None:
    """Show or validate recipes."""


def _flatten(table: dict[str, Any], prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    out = []
    for key, value in table.items():
        path = prefix + (key,)
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, path))
        else:
            out.append((path, value))
    return out


@recipe.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@recipe_options
@click.option("--origin", is_flag=True, help="Show which layer set each value (file, --config, --set #n, default).")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved recipe as JSON.")
@click.pass_context
def show(ctx: click.Context, path: str, configs, sets, unsets, origin: bool, as_json: bool) -> None:
    """Print the resolved recipe (layers merged, overrides applied, defaults filled in)."""
    from dsk.recipe.dump import resolved_to_table, to_toml
    from dsk.recipe.errors import format_path

    result = load_and_validate(ctx, path, configs, sets, unsets)
    table = resolved_to_table(result.resolved)
    if result.recipe.data.get("stages"):
        table["stages"] = result.recipe.data["stages"]
    if as_json:
        payload: dict[str, Any] = {"recipe": table}
        if origin:
            payload["origins"] = {format_path(p): result.recipe.origin(p) or "default" for p, _ in _flatten(table)}
        echo_json(payload)
        return
    if not origin:
        click.echo(to_toml(table), nl=False)
        return
    import tomli_w

    console = stdout_console()
    for p, value in _flatten(table):
        shown = tomli_w.dumps({"v": value}).strip()[4:] if value != {} else "{}"
        console.print(
            f"{escape(format_path(p))} = {escape(shown)}    [dim]# {escape(result.recipe.origin(p) or 'default')}[/]"
        )


@recipe.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@recipe_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per recipe with its problems.")
@click.pass_context
def validate(ctx: click.Context, paths: tuple[str, ...], configs, sets, unsets, as_json: bool) -> None:
    """Check recipes without building anything (no torch import); exit 2 if any has a problem."""
    reports = []
    failed = 0
    for path in paths:
        try:
            load_and_validate(ctx, path, configs, sets, unsets)
            reports.append({"recipe": path, "ok": True, "problems": []})
            if not as_json:
                stdout_console().print(f"[green]ok[/]  {escape(path)}")
        except DskUsageError as exc:
            failed += 1
            reports.append(
                {
                    "recipe": path,
                    "ok": False,
                    "problems": problems_json(exc.problems, exc.recipe) or [{"path": "", "message": exc.message}],
                }
            )
            if not as_json:
                if exc.problems:
                    render_problems(stderr_console(), exc.message, exc.problems, exc.recipe)
                else:
                    exc.show()
    if as_json:
        echo_json(reports if len(reports) > 1 else reports[0])
    if failed:
        ctx.exit(2)
