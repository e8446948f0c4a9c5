"""The public API for dsk plugins.

Built-in plugins import only this module (and `dsk.hookimpl`); a third-party plugin needs nothing else.
This module never imports torch: config models and hook implementations must stay importable by
`dsk --help`, `dsk plugins` and `dsk recipe validate`. Implementations are named by lazy
``"package.module:Attr"`` strings and imported when a run builds them.

Kinds a plugin can register (see ``KINDS``):
    attention   forward(x [B,T,D], pos [T], mask [B,T,S] | None, cache | None) -> y [B,T,D]
    ffn         forward(x [B,T,D]) -> y [B,T,D]; auxiliary losses through ``aux_loss()``
    router      forward(x [N,D]) -> (weights [N,k], experts [N,k], stats)
    mtp         multi-token prediction heads that share the embedding and output head
    feature     apply(model, optimizer, ctx): precision, memory and step features
    parallel    data / expert / pipeline strategies built on torch.distributed
    trainer     run(ctx)
    task        seeded generator of verifiable records with disjoint train/test splits
    reward      fn(prompts, completions, **columns) -> list[float | None]
    tokenizer   text <-> token ids
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler
from pydantic_core import core_schema

from dsk._markers import hookimpl

__all__ = [
    "KINDS",
    "BaseConfig",
    "NoConfig",
    "Problem",
    "ModelContext",
    "ResolvedSlot",
    "Slot",
    "SlotField",
    "SlotMap",
    "SlotMapField",
    "build_component",
    "hookimpl",
]

KINDS: dict[str, str] = {
    "attention": "attention layer (owns its KV-cache layout)",
    "ffn": "feed-forward layer (dense or mixture of experts)",
    "router": "MoE router (top-k expert selection and load balancing)",
    "mtp": "multi-token prediction heads",
    "feature": "precision, memory or step feature applied to model and optimizer",
    "parallel": "parallel strategy on torch.distributed",
    "trainer": "training loop",
    "task": "built-in data generator with verifiable answers",
    "reward": "reward function for RL trainers and rejection sampling",
    "tokenizer": "tokenizer",
}


class BaseConfig(BaseModel):
    """Base for every component config: unknown keys are rejected, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, arbitrary_types_allowed=True)


class NoConfig(BaseConfig):
    """Config of a component that takes no options."""


@dataclass(frozen=True)
class Problem:
    """One problem found while validating a recipe.

    Attributes:
        path: dotted key path in the recipe, e.g. ``model.ffn.router.top_k``.
        message: what is wrong, naming the bad value and what is allowed.
        hint: optional suggestion (did-you-mean, a command to run).
    """

    path: str
    message: str
    hint: str | None = None


@dataclass(frozen=True)
class ModelContext:
    """Model-wide sizes handed to every model component's constructor.

    Components take ``(config, ctx, **extra)``; ``config`` is their own validated config model.
    """

    dim: int
    n_layers: int
    vocab_size: int
    max_seq_len: int
    layer_idx: int = 0
    norm_eps: float = 1e-6
    init_std: float = 0.02


@dataclass
class ResolvedSlot:
    """A recipe table with ``type`` after validation: the chosen component and its validated config.

    ``build(*args, **kwargs)`` imports the implementation and calls ``impl(config, *args, **kwargs)``.
    """

    kind: str
    name: str
    config: Any
    impl: Any = field(repr=False, default=None)
    provider: str = ""

    def load(self) -> Any:
        """Import and return the implementation (class or callable)."""
        if isinstance(self.impl, str):
            from dsk.registry import import_string

            return import_string(self.impl)
        return self.impl

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """Construct the component: ``impl(config, *args, **kwargs)``."""
        return self.load()(self.config, *args, **kwargs)

    def to_table(self) -> dict[str, Any]:
        """The slot as a plain TOML table (``type`` first, then the non-default options)."""
        from dsk.recipe.dump import config_to_table

        return {"type": self.name, **config_to_table(self.config)}

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.is_instance_schema(cls)


class Slot:
    """Annotation marker for a config field holding a nested component slot.

    Use it through :func:`SlotField`. A raw table (``{"type": "noaux_tc", ...}``) given to the field is
    resolved against the registry, so configs can be built directly in tests and scripts.
    """

    def __init__(self, kind: str, default_type: str | None = None):
        self.kind = kind
        self.default_type = default_type

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        kind, default_type = self.kind, self.default_type

        def resolve(value: Any) -> Any:
            if isinstance(value, ResolvedSlot) or value is None:
                return value
            if isinstance(value, str):
                value = {"type": value}
            if not isinstance(value, dict):
                raise ValueError(f"expected a table with 'type' for a {kind} slot, got {type(value).__name__}")
            from dsk.registry import current_registry

            return current_registry().resolve_slot(kind, value, default_type=default_type)

        return core_schema.no_info_before_validator_function(resolve, handler(source))


def SlotField(kind: str, *, default: str | None = None, required: bool = False, description: str = "") -> Any:
    """A config field that is itself a component slot of ``kind``.

    Args:
        kind: the registry kind of the nested component (``router``, ``attention``...).
        default: the component name used when the recipe gives no table (or a table without ``type``).
        required: when True there is no default and the recipe must give the table.
        description: shown by ``dsk components show``.
    """
    extra = {"dsk_slot_kind": kind, "dsk_slot_default": default}
    if required:
        return Field(..., description=description, json_schema_extra=extra)
    if default is None:
        return Field(None, description=description, json_schema_extra=extra)
    return Field(default_factory=lambda: {"type": default}, description=description, json_schema_extra=extra)


def SlotMapField(kind: str, *, description: str = "") -> Any:
    """A config field holding a table of named slots of ``kind`` (``[trainer.rewards.<name>]``).

    Each entry's ``type`` defaults to its key, so ``[trainer.rewards.format] weight = 0.5`` picks the
    reward named ``format``. The field's value is a ``dict[str, ResolvedSlot]``.
    """
    extra = {"dsk_slot_kind": kind, "dsk_slot_map": True}
    return Field(default_factory=dict, description=description, json_schema_extra=extra)


class SlotMap:
    """Annotation marker for a ``dict[str, ResolvedSlot]`` field declared with :func:`SlotMapField`."""

    def __init__(self, kind: str):
        self.kind = kind

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        kind = self.kind

        def resolve(value: Any) -> Any:
            if not isinstance(value, dict):
                raise ValueError(f"expected a table of {kind} slots, got {type(value).__name__}")
            from dsk.registry import current_registry

            reg = current_registry()
            out = {}
            for key, table in value.items():
                if isinstance(table, ResolvedSlot):
                    out[key] = table
                else:
                    out[key] = reg.resolve_slot(
                        kind, dict(table) if isinstance(table, dict) else table, default_type=key
                    )
            return out

        return core_schema.no_info_before_validator_function(resolve, handler(source))


def build_component(kind: str, table: dict[str, Any] | str, *args: Any, **kwargs: Any) -> Any:
    """Resolve ``table`` (``{"type": name, **options}``) against the current registry and build it."""
    from dsk.registry import current_registry

    if isinstance(table, str):
        table = {"type": table}
    return current_registry().resolve_slot(kind, table).build(*args, **kwargs)


def slot_kind(field_info: Any) -> tuple[str, str | None, bool] | None:
    """(kind, default name, is_map) when a pydantic field is a slot or a slot map, else None."""
    extra = getattr(field_info, "json_schema_extra", None)
    if isinstance(extra, dict) and "dsk_slot_kind" in extra:
        return extra["dsk_slot_kind"], extra.get("dsk_slot_default"), bool(extra.get("dsk_slot_map"))
    return None
