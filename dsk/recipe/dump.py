"""Turn validated configs back into TOML tables (``resolved.toml``, ``dsk recipe show``)."""

from __future__ import annotations

from typing import Any

from dsk.api import _plain, config_to_table

__all__ = ["config_to_table", "resolved_to_table", "to_toml"]


def resolved_to_table(resolved: dict[str, Any]) -> dict[str, Any]:
    """A validated recipe (sections of configs and slots) as one plain TOML document."""
    out: dict[str, Any] = {}
    for key, value in resolved.items():
        if value is None:
            continue
        plain = _plain(value)
        if plain == {} and key in ("features", "parallel", "plugins"):
            continue
        out[key] = plain
    return out


def to_toml(table: dict[str, Any]) -> str:
    """Serialise a plain table as TOML text."""
    import tomli_w

    return tomli_w.dumps(table)
