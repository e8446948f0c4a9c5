"""Docs stay true: every hook is documented with its exact signature, every section and command is named."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from dsk import hookspecs
from dsk.cli import LAZY_COMMANDS, SHORT_HELP
from dsk.recipe.schema import SECTIONS

ROOT = Path(__file__).resolve().parents[3]


def _hook_names():
    return [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "dsk_spec")]


def test_every_hook_has_a_reference_heading_with_its_signature():
    text = (ROOT / "docs" / "plugins.md").read_text()
    headings = set(re.findall(r"^### (\w+\(.*\))$", text, flags=re.M))
    for name in _hook_names():
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"{name}({params})" in headings, f"docs/plugins.md lacks '### {name}({params})'"


def test_every_hook_has_a_docstring():
    for name in _hook_names():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name


def test_recipe_doc_names_every_section():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for section in SECTIONS:
        assert section in text, section


def test_every_lazy_command_has_short_help():
    assert set(LAZY_COMMANDS) <= set(SHORT_HELP)
