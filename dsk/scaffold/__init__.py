"""``dsk new-plugin``: write a complete, pip-installable plugin package for one component kind.

The package holds a torch-free ``plugin.py`` that registers the component under its kind (through the hook of
:data:`dsk.registry.HOOK_KINDS`), a torch-free pydantic ``config.py``, a small working implementation, tests that
run the kind's contract suite (``dsk.testing.contracts``), a README and an example recipe. Every kind of
:data:`dsk.api.KINDS` has a template in :mod:`dsk.scaffold.templates` (one module per kind); the files are Python
string templates (``string.Template``), so they ship with the ``dsk`` package like any module.

:func:`plan_plugin` checks the inputs and renders every file in memory; :func:`write_plugin` then writes them into a
temporary folder beside the target and renames it, so bad input or a failed write leaves nothing behind.
"""

from __future__ import annotations

import importlib
import importlib.util
import keyword
import os
import re
import shutil
import string
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from dsk._version import __version__
from dsk.errors import InputError

__all__ = [
    "ScaffoldError",
    "PluginPlan",
    "dsk_requirement",
    "kind_names",
    "template_module",
    "plan_plugin",
    "write_plugin",
]

#: a distribution name as PEP 508 spells it (letters, digits, ``.``, ``_``, ``-``; alphanumeric at both ends)
_DIST_NAME = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)

#: the class-name suffix of each kind's implementation (``SinkhornRouter``, ``MyFFN``...)
_SUFFIX = {
    "attention": "Attention",
    "ffn": "FFN",
    "router": "Router",
    "mtp": "MTP",
    "feature": "Feature",
    "parallel": "Strategy",
    "optimizer": "Optimizer",
    "trainer": "Trainer",
    "task": "Task",
    "reward": "Reward",
    "tokenizer": "Tokenizer",
}


class ScaffoldError(InputError):
    """Bad input to ``dsk new-plugin`` (a name, a kind, a target folder); the CLI reports it with exit code 2."""


@dataclass
class PluginPlan:
    """Everything ``dsk new-plugin`` writes, rendered and checked, before anything touches the disk.

    Attributes:
        dist: the distribution name (``NAME``).
        package: the import package (``NAME`` lowercased, ``-`` -> ``_``).
        component: the registry name (the package without a leading ``dsk_``).
        kind: the component kind.
        target: the folder the package goes into (``DIR/NAME``).
        files: relative path -> text, in writing order.
    """

    dist: str
    package: str
    component: str
    kind: str
    target: Path
    files: dict[str, str] = field(default_factory=dict)


def kind_names() -> list[str]:
    """The kinds a plugin can be generated for: every kind of :data:`dsk.api.KINDS`."""
    from dsk.api import KINDS

    return list(KINDS)


def template_module(kind: str) -> ModuleType:
    """The template module of ``kind`` (:mod:`dsk.scaffold.templates.<kind>`)."""
    return importlib.import_module(f"dsk.scaffold.templates.{kind}")


def dsk_requirement(version: str = __version__) -> str:
    """The dsk versions a generated plugin supports: this minor release (docs/versioning.md), e.g. ``dsk>=0.1,<0.2``."""
    major, minor = (int(p) for p in re.findall(r"\d+", version)[:2])
    if major == 0:
        return f"dsk>={major}.{minor},<{major}.{minor + 1}"
    return f"dsk>={major}.{minor},<{major + 1}"


def _hook_of(kind: str) -> str:
    from dsk.registry import HOOK_KINDS

    return next(hook for hook, kinds in HOOK_KINDS.items() if kind in kinds)


def _builtin_packages() -> set[str]:
    """Top-level packages of the plugins registered in the ``dsk`` entry-point group (the built-ins and any other
    installed plugin): a new plugin must not take their import name."""
    from importlib.metadata import entry_points

    return {ep.value.split(":")[0].split(".")[0] for ep in entry_points(group="dsk")}


def _shadows(package: str) -> str | None:
    """Why ``package`` would shadow an importable module, or None."""
    if package in {"dsk", "torch"} or package in _builtin_packages():
        return "the name of a package dsk itself uses"
    if package in getattr(sys, "stdlib_module_names", ()) or package in sys.builtin_module_names:
        return "a module of the Python standard library"
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is not None:
        where = found.origin or (list(found.submodule_search_locations or []) or ["?"])[0]
        return f"an importable module ({where})"
    return None


def check_name(name: str) -> tuple[str, str]:
    """``(package, component)`` of the distribution ``name``; raises :class:`ScaffoldError` when it is unusable."""
    if not _DIST_NAME.match(name):
        raise ScaffoldError(
            f"NAME {name!r} is not a valid distribution name: use letters, digits, '-', '_' or '.', starting and "
            "ending with a letter or digit (e.g. dsk-sinkhorn-router)"
        )
    package = name.lower().replace("-", "_")
    if not package.isidentifier():
        raise ScaffoldError(
            f"NAME {name!r} gives the package {package!r}, which is not a Python identifier; use letters, digits, "
            "'-' and '_' only, starting with a letter (e.g. dsk-sinkhorn-router)"
        )
    if keyword.iskeyword(package) or keyword.issoftkeyword(package):
        raise ScaffoldError(f"NAME {name!r} gives the package {package!r}, a Python keyword; choose another name")
    why = _shadows(package)
    if why is not None:
        raise ScaffoldError(
            f"NAME {name!r} gives the package {package!r}, which would shadow {why}; choose another name "
            f"(e.g. dsk-{package.removeprefix('dsk_')}-plugin)"
        )
    component = package.removeprefix("dsk_") or package
    return package, component


def check_kind(kind: str) -> str:
    """``kind`` when it is one of :data:`dsk.api.KINDS`; raises :class:`ScaffoldError` with a did-you-mean."""
    from dsk.names import did_you_mean

    kinds = kind_names()
    if kind in kinds:
        return kind
    close = did_you_mean(kind, kinds, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ScaffoldError(f"--kind {kind!r} is not a component kind{hint} (kinds: {', '.join(kinds)})")


def _class_name(component: str, kind: str) -> str:
    """``sinkhorn_router`` + router -> ``SinkhornRouter``; ``sinkhorn`` + router -> ``SinkhornRouter``."""
    camel = "".join(part[:1].upper() + part[1:] for part in component.split("_") if part)
    suffix = _SUFFIX[kind]
    if not camel.lower().endswith(suffix.lower()):
        camel += suffix
    return camel if camel.isidentifier() else f"My{camel}"


def plan_plugin(name: str, kind: str, directory: str | os.PathLike[str] = ".") -> PluginPlan:
    """Check ``name``, ``kind`` and the target ``directory/name`` and render every file of the package.

    Raises:
        ScaffoldError: ``name`` is not a valid distribution name or gives an unusable package name, ``kind`` is
            unknown, or ``directory/name`` already exists (or ``directory`` is not a folder).
    """
    package, component = check_name(name)
    kind = check_kind(kind)
    base = Path(directory)
    if base.exists() and not base.is_dir():
        raise ScaffoldError(f"--dir {str(base)!r} is not a folder")
    target = base / name
    if target.exists() or target.is_symlink():
        raise ScaffoldError(f"{str(target)!r} already exists; remove it or choose another --dir or NAME")

    from dsk.scaffold.templates import common

    tpl = template_module(kind)
    klass = _class_name(component, kind)
    values = {
        "dist": name,
        "pkg": package,
        "comp": component,
        "kind": kind,
        "Class": klass,
        "Config": f"{klass.removesuffix(_SUFFIX[kind]) or klass}Config",
        "module": tpl.MODULE,
        "hook": _hook_of(kind),
        "summary": tpl.SUMMARY,
        "Summary": tpl.SUMMARY[:1].upper() + tpl.SUMMARY[1:],
        "dsk_req": dsk_requirement(),
        "dsk_version": __version__,
    }
    values["impl"] = tpl.IMPL_NAME.format(**values)
    values["table"] = string.Template(tpl.TABLE).substitute(values)
    values["contract"] = tpl.CONTRACT.format(**values)

    def render(text: str, where: str) -> str:
        try:
            return string.Template(text).substitute(values)
        except (KeyError, ValueError) as exc:  # a template bug, never the user's input
            raise RuntimeError(f"dsk.scaffold template {kind}/{where} is broken: {exc!r}") from exc

    files = {
        "pyproject.toml": render(common.PYPROJECT, "pyproject.toml"),
        "README.md": render(common.README, "README.md"),
        f"{package}/__init__.py": render(common.INIT, "__init__.py"),
        f"{package}/plugin.py": render(tpl.PLUGIN if hasattr(tpl, "PLUGIN") else common.PLUGIN, "plugin.py"),
        f"{package}/config.py": render(tpl.CONFIG, "config.py"),
        f"{package}/{tpl.MODULE}.py": render(tpl.IMPL, f"{tpl.MODULE}.py"),
        f"tests/test_{package}.py": render(tpl.TEST, "test.py"),
        "recipes/example.toml": render(common.recipe(tpl.RECIPE), "recipes/example.toml"),
    }
    return PluginPlan(dist=name, package=package, component=component, kind=kind, target=target, files=files)


def write_plugin(plan: PluginPlan) -> list[Path]:
    """Write the planned package; returns the files written (under ``plan.target``).

    The files go into a temporary folder beside the target, renamed to it at the end: a failure leaves nothing.
    """
    parent = plan.target.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{plan.target.name}.", dir=parent))
    try:
        for rel, text in plan.files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        if plan.target.exists():
            raise ScaffoldError(f"{str(plan.target)!r} already exists; remove it or choose another --dir or NAME")
        staging.rename(plan.target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [plan.target / rel for rel in plan.files]
