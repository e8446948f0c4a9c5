"""The ``dsk`` command line: a click group whose commands are imported only when used.

``dsk --help``, ``dsk plugins`` and ``dsk recipe validate`` never import torch: commands are named here
as ``"module:attr"`` strings, and plugin commands are added by the ``register_commands`` hook only when
the CLI looks up a command it does not know or lists its commands.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import click

from dsk import __version__
from dsk.errors import InputError

#: built-in commands, imported lazily
LAZY_COMMANDS: dict[str, str] = {
    "train": "dsk.cli.run_cmd:train",
    "profile": "dsk.cli.profile_cmd:profile",
    "plan": "dsk.cli.plan_cmd:plan",
    "generate": "dsk.cli.model_cmd:generate_cmd",
    "convert": "dsk.cli.model_cmd:convert_cmd",
    "plugins": "dsk.cli.plugins_cmd:plugins",
    "components": "dsk.cli.plugins_cmd:components",
    "recipe": "dsk.cli.recipe_cmd:recipe",
    "eval": "dsk.cli.eval_cmd:eval_cmd",
    "new-plugin": "dsk.cli.new_plugin_cmd:new_plugin",
}

SHORT_HELP: dict[str, str] = {
    "train": "Train from a recipe (one stage or a [[stages]] pipeline).",
    "profile": "Measure time, memory, FLOPs and expert load of recipes.",
    "plan": "Estimate a full-scale run of a recipe: parameters, FLOPs, GPU-hours.",
    "generate": "Sample from a checkpoint (KV cache, MTP speculation).",
    "convert": "Convert checkpoints between HF and dsk formats.",
    "plugins": "List loaded plugins, their versions, components and failures.",
    "components": "List registered components, or show one's options.",
    "recipe": "Show or validate recipes.",
    "eval": "Greedy accuracy of a checkpoint on a task's test split.",
    "new-plugin": "Write a pip-installable plugin package for a component kind.",
}


@dataclass
class App:
    """Per-invocation state shared by commands: the plugin manager and registry, built on first use."""

    local_plugins: list[str] = field(default_factory=list)
    pm: Any = None
    _registry: Any = None
    _plugin_commands: dict[str, Any] | None = None

    def plugin_manager(self) -> Any:
        if self.pm is None:
            from dsk.plugins import make_plugin_manager

            self.pm = make_plugin_manager(local=self.local_plugins)
        return self.pm

    def plugin_commands(self) -> dict[str, Any]:
        """Commands that plugins add through ``register_commands`` (collected once per invocation)."""
        if self._plugin_commands is None:
            pm = self.plugin_manager()
            collector = click.Group("dsk")
            for impl in pm.hook.register_commands.get_hookimpls():
                try:
                    impl.function(**({"cli": collector} if "cli" in impl.argnames else {}))
                except Exception as exc:
                    pm.mark_failed(impl.plugin_name, f"register_commands: {type(exc).__name__}: {exc}")
            self._plugin_commands = {n: c for n, c in collector.commands.items() if n not in LAZY_COMMANDS}
        return self._plugin_commands

    def registry(self) -> Any:
        if self._registry is None:
            from dsk.registry import build_registry

            self._registry = build_registry(self.plugin_manager())
        return self._registry


class DskGroup(click.Group):
    """A click group that imports built-in commands on demand and asks plugins for theirs."""

    def _app(self, ctx: click.Context) -> App:
        root = ctx.find_root()
        if not isinstance(root.obj, App):
            # commands are resolved before the root callback runs: take --plugin from the parsed params
            root.obj = App(local_plugins=list(root.params.get("local_plugins") or ()))
        return root.obj

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(LAZY_COMMANDS) | set(self.commands) | set(self._app(ctx).plugin_commands()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name in LAZY_COMMANDS:
            from dsk.registry import import_string

            cmd = import_string(LAZY_COMMANDS[name])
            self.commands[name] = cmd
            return cmd
        return self._app(ctx).plugin_commands().get(name)

    def invoke(self, ctx: click.Context) -> Any:
        # Bad input that a command (built-in or a plugin's) did not turn into a usage error itself: a data row, a
        # tokenizer file, a checkpoint. It is the user's to fix, so one line and exit 2, never a traceback.
        try:
            return super().invoke(ctx)
        except InputError as exc:
            from dsk.cli.common import DskUsageError

            raise DskUsageError.from_input_error(exc) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # short help from a table so that `dsk --help` imports no command module
        rows = []
        for name in self.list_commands(ctx):
            if name in SHORT_HELP and name not in self.commands:
                rows.append((name, SHORT_HELP[name]))
            else:
                cmd = self.get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit=formatter.width - 20)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=DskGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dsk")
@click.option(
    "--plugin",
    "local_plugins",
    multiple=True,
    metavar="PATH.py|MODULE",
    help="Load a local plugin file or module for this invocation (repeatable).",
)
@click.pass_context
def cli(ctx: click.Context, local_plugins: tuple[str, ...]) -> None:
    """dsk: DeepSeek-V3 pre-training and R1 post-training from TOML recipes.

    \b
    Examples:
      dsk train recipes/quickstart.toml
      dsk train recipes/quickstart.toml --set trainer.steps=50 --set model.ffn.router.type=aux_loss
      dsk recipe validate recipes/*.toml
      dsk components show router/noaux_tc
      dsk plugins
    """
    if not isinstance(ctx.obj, App):
        ctx.obj = App()
    for target in local_plugins:
        if target not in ctx.obj.local_plugins:
            ctx.obj.local_plugins.append(target)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (also ``python -m dsk``, which is what each rank of a multi-process run executes)."""
    from dsk.cli import common
    from dsk.train.distributed import distributed_env

    args = common.INVOCATION_ARGV = list(argv if argv is not None else sys.argv[1:])
    if not distributed_env():
        cli.main(args=args, prog_name="dsk")
        return
    _rank_main(args)


def _rank_main(argv: list[str]) -> None:
    """One rank of a multi-process run: tied to its launcher, and an error reported as one line naming the rank
    (also into torch's error file, which the launcher reads), never a traceback per rank."""
    import os

    from dsk.train.distributed import tie_to_launcher

    tie_to_launcher()
    rank = os.environ.get("RANK", "?")
    try:
        cli.main(args=argv, prog_name="dsk")
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - reported for the launcher, then a non-zero exit
        # the first line that says something: torch wraps errors in ones whose text starts on a later line, and
        # the cause is often the message that names what went wrong
        cause = exc
        while not str(cause).strip() and cause.__cause__ is not None:
            cause = cause.__cause__
        lines = [line.strip() for line in f"{type(cause).__name__}: {cause}".splitlines() if line.strip()]
        message = lines[0] if len(lines) == 1 or not lines[0].endswith(":") else f"{lines[0]} {lines[1]}"
        print(f"dsk: rank {rank}: {message}", file=sys.stderr, flush=True)
        if os.environ.get("DSK_TRACEBACK"):
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        try:
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(exc)
        except Exception:  # noqa: BLE001 - the one-line report above is what matters
            pass
        raise SystemExit(1) from None
