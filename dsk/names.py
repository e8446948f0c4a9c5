"""Name lookup helpers at the bottom of the core's layers: lazy ``"module:attr"`` imports and did-you-mean.

Torch-free and dependency-free, so every other core module (the API, the registry, recipes, plugins) may use them.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

__all__ = ["LookupFailed", "did_you_mean", "import_string"]


class LookupFailed(LookupError):
    """A component name could not be resolved; ``message`` and ``hint`` are user-facing."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message if not hint else f"{message} ({hint})")
        self.message = message
        self.hint = hint


def import_string(path: str) -> Any:
    """Import ``"package.module:Attr"`` (or ``"package.module.Attr"``) and return the attribute."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def did_you_mean(name: str, candidates: list[str] | set[str] | tuple[str, ...], n: int = 3) -> list[str]:
    """Close matches of ``name`` among ``candidates`` (difflib), best first."""
    return difflib.get_close_matches(str(name), sorted(set(candidates)), n=n, cutoff=0.6)
