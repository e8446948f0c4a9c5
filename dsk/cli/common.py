"""Pieces shared by the commands: recipe options, loading + validation, and rendering of problems."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click

from dsk.api import Problem
from dsk.errors import InputError
from dsk.recipe.errors import RecipeError


class DskUsageError(click.ClickException):
    """Bad input (recipe, option, file): printed without a traceback, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, problems: list[Problem] | None = None, recipe: Any = None):
        super().__init__(message)
        self.problems = problems or []
        self.recipe = recipe

    def show(self, file: Any = None) -> None:
        console = stderr_console()
        if self.problems:
            render_problems(console, self.message, self.problems, self.recipe)
        else:
            console.print(f"[bold red]Error:[/] {escape(self.message)}")

    @classmethod
    def from_input_error(cls, exc: InputError) -> DskUsageError:
        """The exit-2 form of bad input found past validation (a data row, a tokenizer file, a checkpoint)."""
        return cls(str(exc))


def escape(text: str) -> str:
    from rich.markup import escape as _escape

    return _escape(str(text))


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _value_text(recipe: Any, path: str) -> tuple[str | None, str | None]:
    """The value at a dotted problem path and the layer that set it, when they can be found."""
    if recipe is None or not path or " " in path:
        return None, None
    from dsk.recipe.load import parse_key_path

    parts: list[Any] = []
    try:
        for seg in path.replace("[", ".").replace("]", "").split("."):
            parts.extend(parse_key_path(seg))
    except ValueError:
        return None, None
    missing = object()
    value = recipe.get(tuple(parts), missing)
    origin = recipe.origin(tuple(parts))
    if value is missing or isinstance(value, dict):
        return None, origin
    try:
        import tomli_w

        shown = tomli_w.dumps({"v": value}).strip()[4:]
    except Exception:
        shown = repr(value)
    return shown, origin


def render_problems(console: Any, headline: str, problems: list[Problem], recipe: Any = None) -> None:
    """Print every problem with its key path, value, the layer that set it, and the hint."""
    console.print(f"[bold red]Error:[/] {escape(headline)}")
    for p in problems:
        value, origin = _value_text(recipe, p.path)
        console.print("")
        if not p.path:  # a file-level problem: the message names the file
            console.print(f"  {escape(p.message)}")
            if p.hint:
                console.print(f"      [cyan]{escape(p.hint)}[/]")
            continue
        line = f"  [bold]{escape(p.path)}[/]"
        if value is not None:
            line += f" = {escape(value)}"
        if origin:
            line += f"    [dim](from {escape(origin)})[/]"
        console.print(line)
        console.print(f"      {escape(p.message)}")
        if p.hint:
            console.print(f"      [cyan]{escape(p.hint)}[/]")
    console.print("")


def problems_json(problems: list[Problem], recipe: Any = None) -> list[dict[str, Any]]:
    out = []
    for p in problems:
        value, origin = _value_text(recipe, p.path)
        out.append({"path": p.path, "message": p.message, "hint": p.hint, "value": value, "origin": origin})
    return out


class _OrderedOverride(click.Option):
    """``--set``/``--unset``: also record (op, value) in command-line order, so they apply in that order."""

    def add_to_parser(self, parser: Any, ctx: click.Context) -> None:
        super().add_to_parser(parser, ctx)
        op = self.name.rstrip("s") if self.name else "set"
        for opt in self.opts:
            parser_opt = getattr(parser, "_long_opt", {}).get(opt) or getattr(parser, "_short_opt", {}).get(opt)
            if parser_opt is None:
                continue
            original = parser_opt.process

            def process(value: Any, state: Any, _original: Callable = original, _op: str = op) -> None:
                ctx.meta.setdefault("dsk.overrides", []).append((_op, value))
                _original(value, state)

            parser_opt.process = process


def recipe_options(func: Callable) -> Callable:
    """--set / --unset / --config options, in the order the design names them."""
    func = click.option(
        "--config",
        "configs",
        multiple=True,
        type=click.Path(dir_okay=False),
        help="Extra TOML file layered above the recipe (repeatable).",
    )(func)
    func = click.option(
        "--unset", "unsets", multiple=True, cls=_OrderedOverride, metavar="KEY", help="Remove a key or table."
    )(func)
    func = click.option(
        "--set",
        "sets",
        multiple=True,
        cls=_OrderedOverride,
        metavar="KEY=VALUE",
        help="Override a recipe value; VALUE is parsed as TOML, else taken as a string (repeatable).",
    )(func)
    return func


def run_options(func: Callable) -> Callable:
    """Options shared by the run commands (train, profile, and plugin run commands)."""
    func = click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")(func)
    func = click.option("--dry-run", is_flag=True, help="Validate and resolve the recipe, write nothing else.")(func)
    func = click.option(
        "--run-dir", type=click.Path(file_okay=False), help="Run directory (default runs/<recipe>-<time>)."
    )(func)
    return recipe_options(func)


#: the arguments of this invocation, as given to :func:`dsk.cli.main` (``--nproc`` re-runs them on every rank)
INVOCATION_ARGV: list[str] | None = None


def nproc_option(func: Callable) -> Callable:
    """``--nproc N``: run the command on N local processes through torch's launcher."""
    return click.option(
        "--nproc",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Run on N local processes (torch.distributed, gloo on CPU, NCCL on GPU); "
        "across nodes use torchrun -m dsk ... instead.",
    )(func)


def overrides_from(ctx: click.Context, sets: tuple[str, ...], unsets: tuple[str, ...]) -> list[tuple[str, str]]:
    recorded = ctx.meta.get("dsk.overrides")
    if recorded is not None and len(recorded) == len(sets) + len(unsets):
        return list(recorded)
    return [("set", s) for s in sets] + [("unset", u) for u in unsets]


def load_and_validate(
    ctx: click.Context,
    path: str | None,
    configs: tuple[str, ...] = (),
    sets: tuple[str, ...] = (),
    unsets: tuple[str, ...] = (),
    require: tuple[str, ...] = (),
):
    """Load, override and validate a recipe; any problem becomes a :class:`DskUsageError` (exit 2)."""
    from dsk.recipe import load_recipe, validate_recipe

    app = ctx.find_root().obj  # the root group's dsk.cli.App (not imported: dsk.cli imports this module)
    try:
        recipe = load_recipe(path, configs=configs, overrides=overrides_from(ctx, sets, unsets))
    except RecipeError as exc:
        raise DskUsageError(_headline(path, exc.problems), exc.problems) from None
    result = validate_recipe(recipe, app.registry(), app.plugin_manager(), require=require)
    if result.problems:
        raise DskUsageError(_headline(path, result.problems), result.problems, recipe)
    return result


def check_launch(ctx: click.Context, result: Any, world_size: int, what: str) -> None:
    """Raise :class:`DskUsageError` (exit 2) with every problem the ``validate_launch`` hook finds in the recipe
    and each of its stages on ``world_size`` processes; ``what`` names them in the headline (``--nproc 4``)."""
    pm = ctx.find_root().obj.plugin_manager()
    problems: list[Problem] = []
    for resolved in [result.resolved, *(r for _, r in result.stages)]:
        for found in pm.hook.validate_launch(resolved=resolved, world_size=world_size):
            problems += [p for p in found or [] if p not in problems]
    if problems:
        raise DskUsageError(f"the recipe cannot run on {what}", problems, result.recipe)


def load_recipe_data(
    ctx: click.Context,
    path: str | None,
    configs: tuple[str, ...] = (),
    sets: tuple[str, ...] = (),
    unsets: tuple[str, ...] = (),
) -> dict[str, Any] | None:
    """The recipe's merged table (layers and overrides applied, not validated), or None when it does not load.

    For a command that adapts its overrides to the recipe's shape before validating it (an option that sets a key
    inside each ``[[stages]]`` entry of some kind); a recipe that does not load is reported by
    :func:`load_and_validate` afterwards, with all its problems.
    """
    from dsk.recipe import load_recipe

    try:
        return load_recipe(path, configs=configs, overrides=overrides_from(ctx, sets, unsets)).data
    except (RecipeError, OSError):
        return None


def add_override(ctx: click.Context, sets: tuple[str, ...], value: str) -> tuple[str, ...]:
    """Append ``--set value`` after the command line's own ``--set``/``--unset`` (which keep their order); returns
    the new ``sets`` to pass on to :func:`load_and_validate`."""
    ctx.meta.setdefault("dsk.overrides", []).append(("set", value))
    return (*sets, value)


def _headline(path: str | None, problems: list[Problem]) -> str:
    n = len(problems)
    what = f"recipe {path}" if path else "recipe"
    return f"{what} has {n} problem{'s' if n != 1 else ''}"


def echo_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


def handle_recipe_errors(func: Callable) -> Callable:
    """Turn a stray RecipeError or InputError raised inside a command into a clean exit-2 message."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RecipeError as exc:
            raise DskUsageError(str(exc), exc.problems) from None
        except InputError as exc:
            raise DskUsageError.from_input_error(exc) from None

    return wrapper
