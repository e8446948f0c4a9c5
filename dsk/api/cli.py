"""The public API for plugin commands: what a ``register_commands`` hook needs to add a run command to ``dsk``.

A plugin command takes the same options as ``dsk train`` (:func:`run_options`: ``--set``, ``--unset``, ``--config``,
``--run-dir``, ``--dry-run``, ``--json``), loads and validates its recipe with :func:`load_and_validate` (every
problem reported at once, exit 2), runs it through the shared build path with :func:`execute` (run directory,
checkpoints, ``--resume``, exit codes; with :func:`nproc_option`, ``--nproc N`` passed on as ``execute(...,
nproc=nproc)`` runs it on N ranks), and prints its own summary (:class:`FittedTable`: a table that stays
readable at 80 columns and in a log). Bad input raises :class:`DskUsageError`; an
:class:`dsk.errors.InputError` raised anywhere below a command is reported the same way by the ``dsk`` group.

Torch-free, like ``dsk --help``: a command module may import this at the top, and imports torch (if ever) inside
the command's body. Example::

    import click
    from dsk.api.cli import execute, load_and_validate, run_options

    @click.command()
    @click.argument("recipe", type=click.Path(dir_okay=False))
    @run_options
    @click.pass_context
    def mycmd(ctx, recipe, configs, sets, unsets, run_dir, dry_run, as_json):
        result = load_and_validate(ctx, recipe, configs, sets, unsets, require=("model", "trainer"))
        done = execute(ctx, result, recipe, run_dir, False, None, dry_run, as_json)
"""

from __future__ import annotations

from dsk.cli.common import (
    DskUsageError,
    add_override,
    echo_json,
    escape,
    handle_recipe_errors,
    load_and_validate,
    load_recipe_data,
    nproc_option,
    overrides_from,
    problems_json,
    recipe_options,
    render_problems,
    run_options,
    stderr_console,
    stdout_console,
)
from dsk.cli.run_cmd import execute
from dsk.errors import InputError
from dsk.train.progress import FittedTable

__all__ = [
    "DskUsageError",
    "FittedTable",
    "InputError",
    "add_override",
    "echo_json",
    "escape",
    "execute",
    "handle_recipe_errors",
    "load_and_validate",
    "load_recipe_data",
    "nproc_option",
    "overrides_from",
    "problems_json",
    "recipe_options",
    "render_problems",
    "run_options",
    "stderr_console",
    "stdout_console",
]
