"""Built-in plugins use the public API only: they import ``dsk`` and ``dsk.api`` (with its submodules
``dsk.api.runtime`` and ``dsk.api.cli``), never the core's internals, exactly as a third party's plugin would."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PLUGINS = ROOT / "plugins"


def _allowed(module: str) -> bool:
    return module == "dsk" or module == "dsk.api" or module.startswith("dsk.api.")


def dsk_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``dsk`` import in a file, inside functions and TYPE_CHECKING blocks included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name == "dsk" or a.name.startswith("dsk.")]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module == "dsk" or node.module.startswith("dsk."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("dsk."):
                out.append((node.lineno, arg.value))
    return sorted(out)


def test_built_in_plugins_import_only_dsk_and_dsk_api():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted(PLUGINS.rglob("*.py"))
        for line, module in dsk_imports(path)
        if not _allowed(module)
    ]
    assert not bad, "plugins reach around dsk.api:\n" + "\n".join(bad)


def test_the_rule_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "p.py"
    f.write_text("def g():\n    from dsk.train.loop import TrainerRun\nfrom dsk.api import BaseConfig\n")
    assert dsk_imports(f) == [(2, "dsk.train.loop"), (3, "dsk.api")]


def test_every_runtime_name_resolves():
    runtime = importlib.import_module("dsk.api.runtime")
    for name in runtime.__all__:
        assert getattr(runtime, name) is not None, name


@pytest.mark.parametrize("module", ["dsk.api", "dsk.api.runtime", "dsk.api.cli"])
def test_the_public_api_modules_import_without_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported by {module}'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_lazy_name_of_dsk_model_resolves():
    model = importlib.import_module("dsk.model")
    for name in model.__all__:
        assert getattr(model, name) is not None, name
