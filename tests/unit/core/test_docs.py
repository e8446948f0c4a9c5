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


def test_every_hook_reference_gives_the_exact_signature_with_types():
    text = (ROOT / "docs" / "plugins.md").read_text()
    for name in _hook_names():
        signature = str(inspect.signature(getattr(hookspecs, name))).replace("'", "")
        line = f"`def {name}{signature}`"
        assert line in text, f"docs/plugins.md lacks the signature line {line}"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def test_every_component_kind_has_a_contract_section_naming_its_suite():
    """A section per kind (every kind of dsk.api.KINDS and every kind a loaded plugin registers), naming its
    contract suite, which exists in dsk.testing.contracts."""
    import importlib

    from dsk.api import KINDS
    from dsk.testing import builtin_registry

    kinds_text = _section((ROOT / "docs" / "plugins.md").read_text(), "## Component kinds and their contracts")
    bodies = re.split(r"^### ", kinds_text, flags=re.M)[1:]
    sections = {body.split("\n", 1)[0].strip(): body for body in bodies}
    for kind in sorted(set(KINDS) | set(builtin_registry().kinds())):
        body = sections.get(f"`{kind}`")
        assert body is not None, f"docs/plugins.md has no '### `{kind}`' section under the component kinds"
        suite = re.search(r"`(model|data|run)\.(check_\w+)\(", body)
        assert suite and suite.group(2) == f"check_{kind}", f"the '{kind}' section names no check_{kind} suite"
        module = importlib.import_module(f"dsk.testing.contracts.{suite.group(1)}")
        assert callable(getattr(module, suite.group(2), None)), f"{suite.group(0)} does not exist"


def test_every_hook_has_a_docstring():
    for name in _hook_names():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name


def test_recipe_doc_names_every_section():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for section in SECTIONS:
        assert section in text, section


def test_every_lazy_command_has_short_help():
    assert set(LAZY_COMMANDS) <= set(SHORT_HELP)
