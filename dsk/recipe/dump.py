"""Turn validated configs back into TOML tables (``resolved.toml``, ``dsk recipe show``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from dsk.api import ResolvedSlot, slot_kind


def _plain(value: Any) -> Any:
    """Drop what TOML cannot hold (None) and turn nested configs and slots into tables."""
    if isinstance(value, ResolvedSlot):
        return value.to_table()
    if isinstance(value, BaseModel):
        return config_to_table(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value if v is not None]
    return value


def config_to_table(config: BaseModel) -> dict[str, Any]:
    """Every option of a config (defaults included), slots as nested tables, None values left out."""
    cls = type(config)
    slot_fields = {name for name, f in cls.model_fields.items() if slot_kind(f) is not None}
    dumped = config.model_dump(mode="json", by_alias=True, exclude=slot_fields)
    table = _plain(dumped)
    for name in (n for n in cls.model_fields if n in slot_fields):  # field order: a set would vary per process
        value = getattr(config, name)
        if value is not None:
            table[cls.model_fields[name].alias or name] = _plain(value)
    return table


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
