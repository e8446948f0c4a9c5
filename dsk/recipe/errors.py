"""Recipe problems and their rendering: each with its dotted key path, the layer that set it and a hint."""

from __future__ import annotations

from typing import Any

from dsk.api import Problem


class RecipeError(Exception):
    """One or more problems in a recipe; the CLI prints them all and exits with code 2."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__("; ".join(f"{p.path or '<recipe>'}: {p.message}" for p in self.problems))


def format_path(parts: tuple[Any, ...] | list[Any]) -> str:
    """``("stages", 0, "trainer")`` -> ``stages[0].trainer``."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def join(path: str, key: Any) -> str:
    """Append one key to a dotted path."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)
