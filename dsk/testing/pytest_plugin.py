"""pytest fixtures for dsk and its plugins (registered through the ``pytest11`` entry point)."""

from __future__ import annotations

import pytest

from dsk.testing import isolated_plugin_manager, run_dsk


@pytest.fixture
def dsk_pm():
    """A fresh plugin manager with dsk's built-in plugins only."""
    return isolated_plugin_manager()


@pytest.fixture
def dsk_registry(dsk_pm):
    """The registry built from ``dsk_pm`` (pass it explicitly where a config is validated from plain tables)."""
    from dsk.registry import build_registry

    return build_registry(dsk_pm)


@pytest.fixture
def dsk_cli(dsk_pm):
    """Run the CLI in-process against ``dsk_pm``: ``dsk_cli(["plugins", "--json"])``."""

    def invoke(args, pm=None, input=None):
        return run_dsk(list(args), pm=pm or dsk_pm, input=input)

    return invoke
