"""The core's modules form layers: the import graph of ``dsk/`` has no cycle, lazy and string imports included."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CORE = ROOT / "dsk"
# "package.module:attr" / "package.module" strings naming a dsk module (lazy maps, import_string targets)
_STRING_TARGET = re.compile(r"^(dsk(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?::[A-Za-z_][A-Za-z0-9_.]*)?$")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The dsk module that importing ``target`` executes (the longest known prefix)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in modules:
            return name
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every dsk module that ``name`` imports: module level, inside functions, via importlib or a lazy string;
    ``if TYPE_CHECKING:`` blocks are left out (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    strings: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                out.add(f"{mod}.{alias.name}")  # a submodule when it is one, else resolved to ``mod``
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _STRING_TARGET.match(node.value)
            if m and m.group(1) in modules:  # a string names a module only when it is one ("dsk.extends" is a key)
                strings.add(m.group(1))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    resolved = {_resolve(t, modules) for t in out if t == "dsk" or t.startswith("dsk.")} | strings
    return {r for r in resolved if r is not None and r != name}


def import_graph() -> dict[str, set[str]]:
    modules = core_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_core_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in dsk/: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_lazy_and_string_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    source = tmp_path / "dsk" / "x.py"
    source.parent.mkdir()
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import dsk.z\n"
        "def f():\n    from dsk import y\n"
        "LAZY = {'g': 'dsk.w:G'}\n",
        encoding="utf-8",
    )
    modules = {"dsk.x": source, "dsk.y": source, "dsk.z": source, "dsk.w": source, "dsk": source}
    assert imports_of("dsk.x", source, modules) == {"dsk.y", "dsk.w"}


@pytest.mark.parametrize("name", ["dsk", "dsk.api", "dsk.api.runtime", "dsk.registry", "dsk.recipe", "dsk.hookspecs"])
def test_core_entry_modules_import_without_torch(name):
    import subprocess
    import sys

    code = f"import sys, {name}; assert 'torch' not in sys.modules, 'torch imported by {name}'"
    assert importlib.util.find_spec(name) is not None
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
