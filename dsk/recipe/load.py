"""Load a recipe: read its TOML layers, merge them, apply ``--config``/``--set``/``--unset``, track provenance.

Precedence, lowest to highest: ``extends`` entries (depth first, in order) < the file itself < ``--config``
files (in order) < ``--set``/``--unset`` (in command-line order). Tables merge key by key; scalars and
arrays replace. When a later layer gives a slot (a table with ``type``) a different ``type``, the slot is
replaced rather than merged, so options of the old component do not leak into the new one.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dsk.api import Problem
from dsk.names import did_you_mean
from dsk.recipe.errors import RecipeError, format_path

Path_ = tuple[Any, ...]


@dataclass
class Recipe:
    """A merged recipe: plain TOML data plus where each value came from."""

    data: dict[str, Any]
    origins: dict[Path_, str] = field(default_factory=dict)
    source: str | None = None
    files: list[str] = field(default_factory=list)

    def origin(self, path: Path_) -> str | None:
        """The layer that set ``path`` (or its closest parent that has a record)."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                return self.origins[path[:n]]
        return None

    def get(self, path: Path_, default: Any = None) -> Any:
        node: Any = self.data
        for key in path:
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                return default
        return node

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source else "recipe"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_toml(path: Path, what: str = "recipe") -> dict[str, Any]:
    """Read one TOML file; problems name the file and the line the TOML parser reports."""
    shown = _display(path)
    if not path.exists():
        raise RecipeError([Problem("", f"{what} file not found: {shown}")], source=shown)
    if path.is_dir():
        raise RecipeError([Problem("", f"{what} path is a directory, not a TOML file: {shown}")], source=shown)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem("", f"{shown}: not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None
    except OSError as exc:
        raise RecipeError([Problem("", f"cannot read {shown}: {exc.strerror}")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([Problem("", f"{shown}: invalid TOML: {exc}")], source=shown) from None


def _is_slot(node: Any) -> bool:
    return isinstance(node, dict) and "type" in node


def _drop_origins(origins: dict[Path_, str], prefix: Path_) -> None:
    for key in [k for k in origins if k[: len(prefix)] == prefix]:
        del origins[key]


def _record(origins: dict[Path_, str], prefix: Path_, value: Any, origin: str) -> None:
    origins[prefix] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origins, prefix + (k,), v, origin)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if isinstance(v, dict):
                _record(origins, prefix + (i,), v, origin)


def merge_into(
    base: dict[str, Any], layer: dict[str, Any], origins: dict[Path_, str], origin: str, prefix: Path_ = ()
) -> None:
    """Deep-merge ``layer`` into ``base`` in place, recording the origin of each value it sets."""
    for key, value in layer.items():
        path = prefix + (key,)
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            if _is_slot(value) and _is_slot(current) and value["type"] != current["type"]:
                # a different component: its options replace the old slot wholesale
                _drop_origins(origins, path)
                base[key] = copy.deepcopy(value)
                _record(origins, path, value, origin)
            else:
                merge_into(current, value, origins, origin, path)
        else:
            _drop_origins(origins, path)
            base[key] = copy.deepcopy(value)
            _record(origins, path, value, origin)


def _load_layers(path: Path, stack: list[Path], out: list[tuple[str, dict[str, Any]]], files: list[str]) -> None:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(_display(p) for p in stack[stack.index(resolved) :] + [resolved])
        raise RecipeError([Problem("dsk.extends", f"cycle in extends: {chain}")], source=_display(stack[0]))
    data = read_toml(path)
    shown = _display(path)
    meta = data.get("dsk", {})
    extends: Any = meta.get("extends", []) if isinstance(meta, dict) else []
    if isinstance(extends, str):
        extends = [extends]
    if not isinstance(extends, list) or not all(isinstance(e, str) for e in extends):
        raise RecipeError([Problem("dsk.extends", f"must be a path or a list of paths (in {shown})")], source=shown)
    for entry in extends:
        target = (path.parent / entry) if not Path(entry).is_absolute() else Path(entry)
        if not target.exists():
            raise RecipeError(
                [
                    Problem(
                        "dsk.extends",
                        f"{shown} extends '{entry}', which does not exist (looked for {_display(target)})",
                    )
                ],
                source=shown,
            )
        _load_layers(target, stack + [resolved], out, files)
    if isinstance(meta, dict) and "extends" in meta:
        data = dict(data)
        data["dsk"] = {k: v for k, v in meta.items() if k != "extends"}
    out.append((shown, data))
    files.append(shown)


_SEGMENT = re.compile(r"^[A-Za-z0-9_\-]+$")


def parse_key_path(text: str) -> tuple[Any, ...]:
    """``a.b.0.c`` -> ``("a", "b", 0, "c")``; raises ValueError on an empty or malformed segment."""
    parts: list[Any] = []
    for seg in text.split("."):
        if not seg or not _SEGMENT.match(seg):
            raise ValueError(f"malformed key path '{text}' (segments are letters, digits, '_' or '-')")
        parts.append(int(seg) if seg.isdigit() else seg)
    return tuple(parts)


def parse_value(text: str) -> Any:
    """Parse an override value as a TOML value (``10``, ``true``, ``[1,2]``, ``"x"``); else take it as a string."""
    if "\n" not in text:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return text


def _by_name(data: Any, path: tuple[Any, ...]) -> tuple[Any, ...]:
    """``path`` with each name that picks an element of an array of tables (``stages.grpo``) replaced by the index
    of the element whose ``name`` it is (``stages.1``); other paths unchanged."""
    node, out = data, []
    for i, key in enumerate(path):
        if isinstance(node, list) and isinstance(key, str):
            names = [e.get("name") if isinstance(e, dict) else None for e in node]
            if key not in names:
                known = ", ".join(str(n) for n in names if n is not None) or "none has a name"
                where = format_path(tuple(out) + (key,))
                raise RecipeError([Problem(format_path(path), f"{where}: no element named {key!r} ({known})", None)])
            key = names.index(key)
        out.append(key)
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return tuple(out) + tuple(path[i + 1 :])
    return tuple(out)


def apply_set(recipe: Recipe, path: tuple[Any, ...], value: Any, origin: str) -> None:
    """Set ``path`` to ``value``, creating tables on the way; a new slot ``type`` resets the slot. An element of an
    array of tables is picked by its index or by its ``name`` (``stages.grpo.trainer.steps``)."""
    path = _by_name(recipe.data, path)
    node: Any = recipe.data
    for i, key in enumerate(path[:-1]):
        where = format_path(path[: i + 1])
        if isinstance(node, list):
            if not isinstance(key, int) or key >= len(node):
                raise RecipeError([Problem(format_path(path), f"{where}: no such array element", None)])
            node = node[key]
            continue
        if not isinstance(node, dict):
            raise RecipeError([Problem(format_path(path), f"cannot set inside {format_path(path[:i])}: not a table")])
        if key not in node:
            node[key] = {}
        elif not isinstance(node[key], (dict, list)):
            raise RecipeError(
                [Problem(format_path(path), f"cannot set {format_path(path)}: {where} is a value, not a table")]
            )
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise RecipeError([Problem(format_path(path), "no such array element")])
        node[last] = value
    elif isinstance(node, dict):
        if last == "type" and "type" in node and node["type"] != value:
            node.clear()  # a different component: drop the old component's options
            _drop_origins(recipe.origins, path[:-1])
        node[last] = value
    else:
        raise RecipeError([Problem(format_path(path), f"cannot set inside {format_path(path[:-1])}: not a table")])
    _drop_origins(recipe.origins, path)
    _record(recipe.origins, path, value, origin)


def apply_unset(recipe: Recipe, path: tuple[Any, ...], origin: str) -> None:
    """Remove ``path`` (a key or a whole table); an unknown path is an error with a suggestion."""
    path = _by_name(recipe.data, path)
    node: Any = recipe.data
    for i, key in enumerate(path):
        container = node
        if isinstance(container, dict) and key in container:
            node = container[key]
        elif isinstance(container, list) and isinstance(key, int) and key < len(container):
            node = container[key]
        else:
            siblings = list(container) if isinstance(container, dict) else []
            close = did_you_mean(str(key), [str(s) for s in siblings])
            hint = f"did you mean '{format_path(path[:i] + (close[0],))}'?" if close else None
            raise RecipeError(
                [Problem(format_path(path), f"cannot unset {format_path(path)}: not in the recipe", hint)]
            )
        if i == len(path) - 1:
            del container[key]
    _drop_origins(recipe.origins, path)


def load_recipe(
    path: str | Path | None,
    *,
    configs: list[str] | tuple[str, ...] = (),
    sets: list[str] | tuple[str, ...] = (),
    unsets: list[str] | tuple[str, ...] = (),
    overrides: list[tuple[str, str]] | None = None,
) -> Recipe:
    """Load ``path`` with its ``extends`` chain, then ``--config`` files, then overrides.

    Args:
        path: the recipe file (None: start from an empty recipe, overrides only).
        configs: extra TOML files layered above the recipe, in order.
        sets: ``a.b=VALUE`` strings (VALUE parsed as TOML, else a string), applied in order.
        unsets: key paths to remove.
        overrides: ``("set"|"unset", text)`` pairs in command-line order; when given, it replaces
            ``sets``/``unsets`` so that their relative order is kept.

    Raises:
        RecipeError: a file is missing or not valid TOML, ``extends`` has a cycle, or an override is malformed.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    files: list[str] = []
    source = None
    if path is not None:
        source = _display(Path(path))
        _load_layers(Path(path), [], layers, files)
    for cfg in configs:
        cfg_layers: list[tuple[str, dict[str, Any]]] = []
        _load_layers(Path(cfg), [], cfg_layers, files)
        layers.extend((f"--config {name}", data) for name, data in cfg_layers)
    recipe = Recipe(data={}, source=source, files=files)
    for origin, data in layers:
        merge_into(recipe.data, data, recipe.origins, origin)
    if overrides is None:
        overrides = [("set", s) for s in sets] + [("unset", u) for u in unsets]
    problems: list[Problem] = []
    n_set = n_unset = 0
    for op, text in overrides:
        try:
            if op == "set":
                n_set += 1
                key, sep, value = text.partition("=")
                if not sep:
                    raise RecipeError([Problem(key.strip(), f"--set #{n_set} '{text}' is not KEY=VALUE")])
                apply_set(recipe, parse_key_path(key.strip()), parse_value(value.strip()), f"--set #{n_set}")
            else:
                n_unset += 1
                apply_unset(recipe, parse_key_path(text.strip()), f"--unset #{n_unset}")
        except ValueError as exc:
            problems.append(Problem(text.partition("=")[0].strip(), f"--{op}: {exc}"))
        except RecipeError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RecipeError(problems, source=source)
    return recipe
