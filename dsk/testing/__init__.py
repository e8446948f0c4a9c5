"""Helpers for testing dsk and dsk plugins: isolated plugin managers and a CLI runner.

Installed as a pytest plugin (entry point ``pytest11``), so the fixtures ``dsk_pm``, ``dsk_app`` and
``run_dsk`` are available in any test suite that has dsk installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsk.plugins import DskPluginManager, make_plugin_manager


def isolated_plugin_manager(*plugins: Any, builtins: bool = True, local: tuple[str, ...] = ()) -> DskPluginManager:
    """A fresh plugin manager: dsk's built-in plugins (from entry points of the ``dsk`` distribution) plus ``plugins``.

    Third-party plugins installed in the environment are not loaded, so tests do not depend on them.
    """
    allow = {"dsk"} if builtins else set()
    return make_plugin_manager(entrypoints=True, allow=allow, plugins=plugins, local=local)


def builtin_registry() -> Any:
    """The registry of dsk's built-in plugins (built once per process); pass it explicitly, e.g.
    ``builtin_registry().validate(ModelConfig, table)`` resolves a model table's slots against it."""
    from dsk.registry import build_registry

    if not _BUILTIN:
        _BUILTIN.append(build_registry(isolated_plugin_manager()))
    return _BUILTIN[0]


_BUILTIN: list[Any] = []  # the cache of builtin_registry(): a registry is immutable once built


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_dsk(args: list[str], pm: DskPluginManager | None = None, input: str | None = None) -> CliResult:
    """Invoke the ``dsk`` CLI in-process with ``pm`` (default: built-ins only); returns exit code and output."""
    from click.testing import CliRunner

    from dsk.cli import App, cli

    runner = CliRunner()
    app = App(pm=pm if pm is not None else isolated_plugin_manager())
    result = runner.invoke(cli, args, obj=app, input=input, catch_exceptions=True)
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return CliResult(result.exit_code, result.stdout, result.stderr, exc)
