"""``dsk new-plugin``: every kind has a template that renders a complete package whose plugin and config modules
import without torch and register the component under its kind; bad input is exit 2 with one line, writing nothing.

Running the generated packages' own tests, installing one with pip and training its recipe is
tests/e2e/test_new_plugin.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

import pytest

from dsk.api import KINDS
from dsk.recipe.load import tomllib
from dsk.registry import HOOK_KINDS, build_registry
from dsk.scaffold import dsk_requirement, plan_plugin, template_module
from dsk.testing import isolated_plugin_manager, run_dsk

KIND_NAMES = list(KINDS)


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One package per kind, written by the CLI: {kind: package folder}."""
    root = tmp_path_factory.mktemp("scaffold")
    out = {}
    for kind in KIND_NAMES:
        result = run_dsk(["new-plugin", f"dsk-probe-{kind}", "--kind", kind, "--dir", str(root)])
        assert result.exit_code == 0, result.output
        out[kind] = root / f"dsk-probe-{kind}"
    return out


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_every_kind_has_a_template(kind):
    tpl = template_module(kind)
    for attr in ("SUMMARY", "MODULE", "TABLE", "IMPL_NAME", "CONTRACT", "CONFIG", "IMPL", "TEST", "RECIPE"):
        assert getattr(tpl, attr, None) is not None, f"template {kind} lacks {attr}"


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_the_package_is_complete(generated, kind):
    path = generated[kind]
    pkg = f"dsk_probe_{kind}"
    module = template_module(kind).MODULE
    assert files_under(path) == sorted(
        [
            "README.md",
            "pyproject.toml",
            pkg,
            f"{pkg}/__init__.py",
            f"{pkg}/config.py",
            f"{pkg}/plugin.py",
            f"{pkg}/{module}.py",
            "recipes",
            "recipes/example.toml",
            "tests",
            f"tests/test_{pkg}.py",
        ]
    )
    project = tomllib.loads((path / "pyproject.toml").read_text())
    assert project["project"]["name"] == f"dsk-probe-{kind}"
    assert project["project"]["version"] == "0.1.0"
    assert project["project"]["dependencies"] == [dsk_requirement()]
    assert project["project"]["entry-points"]["dsk"] == {f"probe_{kind}": f"{pkg}.plugin"}
    assert "pytest" in project["project"]["optional-dependencies"]["test"][0]
    for py in path.rglob("*.py"):
        ast.parse(py.read_text(), filename=str(py))  # every template renders to valid Python
    recipe = tomllib.loads((path / "recipes" / "example.toml").read_text())
    assert recipe["trainer"]["type"]
    readme = (path / "README.md").read_text()
    assert "pip install -e ." in readme and "pytest" in readme and template_module(kind).CONTRACT in readme


def test_the_supported_versions_are_this_minor_release():
    assert dsk_requirement("0.1.0") == "dsk>=0.1,<0.2"
    assert dsk_requirement("0.12.3") == "dsk>=0.12,<0.13"
    assert dsk_requirement("2.3.0") == "dsk>=2.3,<3"


def test_plugin_and_config_modules_import_without_torch(generated):
    paths = [str(p) for p in generated.values()]
    code = textwrap.dedent(
        f"""
        import importlib, sys
        sys.path[:0] = {paths!r}
        for kind in {KIND_NAMES!r}:
            importlib.import_module(f"dsk_probe_{{kind}}.plugin")
            importlib.import_module(f"dsk_probe_{{kind}}.config")
        heavy = sorted(m for m in ("torch", "numpy") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_each_plugin_registers_its_component_through_the_right_hook(generated, monkeypatch):
    import importlib

    for path in generated.values():
        monkeypatch.syspath_prepend(str(path))
    modules = [importlib.import_module(f"dsk_probe_{kind}.plugin") for kind in KIND_NAMES]
    pm = isolated_plugin_manager(*modules, builtins=False)
    registry = build_registry(pm)
    assert not pm.failures() and not registry.errors
    provided = {(s.kind, s.name): s for s in registry.all()}
    for kind, module in zip(KIND_NAMES, modules, strict=True):
        spec = provided[(kind, f"probe_{kind}")]
        assert spec.impl.startswith(f"dsk_probe_{kind}.")  # a lazy "module:attr" string
        hook = next(h for h, kinds in HOOK_KINDS.items() if kind in kinds)
        assert hasattr(module, hook)
        fields = spec.config.model_fields
        assert fields and all(not f.is_required() and f.description for f in fields.values()), kind


def test_success_prints_the_tree_and_the_next_commands(tmp_path):
    result = run_dsk(["new-plugin", "dsk-ok-reward", "--kind", "reward", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for text in ("dsk_ok_reward/", "reward.py", "recipes/", "example.toml", "pip install -e", "pytest",
                 "dsk plugins", "dsk train"):  # fmt: skip
        assert text in result.stdout, text
    assert "component reward/ok_reward" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["bad-", "--kind", "router"], "is not a valid distribution name"),
        (["a b", "--kind", "router"], "is not a valid distribution name"),
        (["my.router", "--kind", "router"], "which is not a Python identifier"),
        (["9lives", "--kind", "router"], "which is not a Python identifier"),
        (["class", "--kind", "router"], "a Python keyword"),
        (["json", "--kind", "router"], "shadow a module of the Python standard library"),
        (["torch", "--kind", "router"], "shadow the name of a package dsk itself uses"),
        (["dsk", "--kind", "router"], "shadow the name of a package dsk itself uses"),
        (["dsk-moe", "--kind", "router"], "shadow the name of a package dsk itself uses"),
        (["pytest", "--kind", "router"], "shadow an importable module"),
        (["dsk-x", "--kind", "routr"], "--kind 'routr' is not a component kind; did you mean 'router'?"),
        (["dsk-x", "--kind", "nonsense"], "(kinds: attention, ffn, router, mtp, feature, parallel, optimizer"),
    ],
)
def test_bad_input_is_exit_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    result = run_dsk(["new-plugin", *args, "--dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.output and result.exception is None
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_left_untouched(tmp_path):
    target = tmp_path / "dsk-taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    result = run_dsk(["new-plugin", "dsk-taken", "--kind", "ffn", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "already exists" in result.stderr
    assert files_under(tmp_path) == ["dsk-taken", "dsk-taken/mine.txt"]
    assert (target / "mine.txt").read_text() == "keep me"


def test_missing_kind_is_a_usage_error(tmp_path):
    result = run_dsk(["new-plugin", "dsk-x", "--dir", str(tmp_path)])
    assert result.exit_code == 2 and "--kind" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_plan_renders_in_memory_only(tmp_path):
    plan = plan_plugin("dsk-mem-task", "task", tmp_path)
    assert plan.package == "dsk_mem_task" and plan.component == "mem_task" and plan.kind == "task"
    assert "dsk_mem_task/task.py" in plan.files and list(tmp_path.iterdir()) == []


def test_help_lists_the_kinds_and_an_example():
    result = run_dsk(["new-plugin", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "Write a complete plugin package NAME" in text
    assert "dsk new-plugin dsk-sinkhorn-router --kind router" in text
    assert ", ".join(KINDS) in text
    root = run_dsk(["--help"])
    assert "new-plugin" in root.stdout
