"""The public API for dsk plugins.

Built-in plugins import only this module (and `dsk.hookimpl`); a third-party plugin needs nothing else.
This module never imports torch: config models and hook implementations must stay importable by
`dsk --help`, `dsk plugins` and `dsk recipe validate`. Implementations are named by lazy
``"package.module:Attr"`` strings and imported when a run builds them.

Kinds a plugin can register (see ``KINDS``):
    attention   forward(x [B,T,D], pos [T] | [B,T], mask [B,T,S] | None, cache | None) -> y [B,T,D];
                make_cache(B, max_len, device, dtype) -> dsk.api.AttentionCache: a length per row, row b's new
                tokens at slots lengths[b].., positions(T) -> [T] (rows agree) | [B,T], truncate(int | [B])
    ffn         forward(x [B,T,D]) -> y [B,T,D]; auxiliary losses through ``aux_loss()``
    router      forward(x [N,D]) -> (weights [N,k], experts [N,k], stats)
    mtp         multi-token prediction heads that share the embedding and output head
    feature     dsk.api.Feature: acts in declared stages (model transform, weights, optimizer wrap, step, state)
    parallel    dsk.api.ParallelStrategy: process groups, model wrap, data shard, reductions, writing rank
    optimizer   impl(config, model) -> torch.optim.Optimizer (groups carry "names"); config subclasses OptimizerConfig
    trainer     run(ctx)
    task        seeded generator of verifiable records with disjoint train/test splits
    reward      fn(prompts, completions, **columns) -> list[float | None]
    tokenizer   text <-> token ids
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, model_validator
from pydantic_core import core_schema

from dsk._markers import hookimpl
from dsk.api.contracts import (
    FEATURE_STAGES,
    SHARDED_PARAM,
    AfterOptimizerStep,
    AuxLossSource,
    Cost,
    CostModel,
    ExpertShardable,
    Feature,
    LinearLayers,
    LinearShapes,
    ParallelStrategy,
    Profiled,
    StepStatistics,
)
from dsk.errors import InputError
from dsk.names import import_string

__all__ = [
    "FEATURE_STAGES",
    "AfterOptimizerStep",
    "AuxLossSource",
    "Cost",
    "CostModel",
    "Profiled",
    "Feature",
    "InputError",
    "ExpertShardable",
    "LinearLayers",
    "LinearShapes",
    "OptimizerConfig",
    "ParallelStrategy",
    "SHARDED_PARAM",
    "StepStatistics",
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
    "optimizer": "optimizer built from the model's parameters (its state saved by parameter name)",
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


class OptimizerConfig(BaseConfig):
    """The options every optimizer component has (``[optimizer]``): learning-rate schedule and clipping.

    One place for all trainers: a trainer may declare different *defaults* (``optimizer_defaults`` on its config
    class, e.g. RL's constant schedule), applied under what the recipe sets. The rate of optimizer step s of S is
    a linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr`` (or constant).
    """

    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(1e-4, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up from lr/warmup_steps to lr over these steps")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="after warm-up: cosine decay from lr to min_lr over the remaining steps, or constant lr"
    )
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this value (0: no clipping)")

    @model_validator(mode="after")
    def _check_rates(self) -> OptimizerConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr = {self.min_lr} is larger than lr = {self.lr}")
        return self


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
            return import_string(self.impl)
        return self.impl

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """Construct the component: ``impl(config, *args, **kwargs)``."""
        return self.load()(self.config, *args, **kwargs)

    def to_table(self) -> dict[str, Any]:
        """The slot as a plain TOML table (``type`` first, then the non-default options)."""
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

        def resolve(value: Any, info: core_schema.ValidationInfo) -> Any:
            if isinstance(value, ResolvedSlot) or value is None:
                return value
            if isinstance(value, str):
                value = {"type": value}
            if not isinstance(value, dict):
                raise ValueError(f"expected a table with 'type' for a {kind} slot, got {type(value).__name__}")
            return _registry_of(info).resolve_slot(kind, value, default_type=default_type)

        return core_schema.with_info_before_validator_function(resolve, handler(source))


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

        def resolve(value: Any, info: core_schema.ValidationInfo) -> Any:
            if not isinstance(value, dict):
                raise ValueError(f"expected a table of {kind} slots, got {type(value).__name__}")
            if all(isinstance(t, ResolvedSlot) for t in value.values()):
                return value
            reg = _registry_of(info)
            out = {}
            for key, table in value.items():
                if isinstance(table, ResolvedSlot):
                    out[key] = table
                else:
                    out[key] = reg.resolve_slot(
                        kind, dict(table) if isinstance(table, dict) else table, default_type=key
                    )
            return out

        return core_schema.with_info_before_validator_function(resolve, handler(source))


def _registry_of(info: core_schema.ValidationInfo) -> Any:
    """The registry a raw slot table is resolved against: passed explicitly as the validation context."""
    registry = (info.context or {}).get("registry") if isinstance(info.context, dict) else None
    if registry is None:
        raise ValueError(
            "a component table given as plain data needs the registry to resolve its 'type': validate with "
            "Model.model_validate(table, context={'registry': registry})"
        )
    return registry


def build_component(registry: Any, kind: str, table: dict[str, Any] | str, *args: Any, **kwargs: Any) -> Any:
    """Resolve ``table`` (``{"type": name, **options}``) against ``registry`` and build it with ``args``."""
    if isinstance(table, str):
        table = {"type": table}
    return registry.resolve_slot(kind, table).build(*args, **kwargs)


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


def slot_kind(field_info: Any) -> tuple[str, str | None, bool] | None:
    """(kind, default name, is_map) when a pydantic field is a slot or a slot map, else None."""
    extra = getattr(field_info, "json_schema_extra", None)
    if isinstance(extra, dict) and "dsk_slot_kind" in extra:
        return extra["dsk_slot_kind"], extra.get("dsk_slot_default"), bool(extra.get("dsk_slot_map"))
    return None


# ---------------------------------------------------------------------------------------------------------------
# HF checkpoint mapping: the adapter contract of dsk/api/hf.py (each component maps its own HF config and weights)
# ---------------------------------------------------------------------------------------------------------------
from dsk.api.hf import HFAdapter, HFCheckpoint, HFLayout  # noqa: E402 - kept in its own section

__all__ += ["HFAdapter", "HFCheckpoint", "HFLayout"]


# ---------------------------------------------------------------------------------------------------------------
# Generation: the attention-cache contract (a length per row) and the speculative-decoding drafter protocol
# (dsk/api/generation.py)
# ---------------------------------------------------------------------------------------------------------------
from dsk.api.generation import AttentionCache, Drafter, DrafterProvider  # noqa: E402 - kept in its own section

__all__ += ["AttentionCache", "Drafter", "DrafterProvider"]


# ---------------------------------------------------------------------------------------------------------------
# Cost shares: the run's memory and communication estimate and the protocol config models fill it in with
# (dsk/api/estimate.py)
# ---------------------------------------------------------------------------------------------------------------
from dsk.api.estimate import (  # noqa: E402 - kept in its own section
    ActivationBytes,
    PartEstimate,
    RankMemory,
    RankStages,
    RunEstimate,
    SharesCost,
    StageLoad,
)

__all__ += ["ActivationBytes", "PartEstimate", "RankMemory", "RankStages", "RunEstimate", "SharesCost", "StageLoad"]


# ---------------------------------------------------------------------------------------------------------------
# Deprecations (docs/versioning.md): an old name keeps working for one minor release and warns, naming its
# replacement
# ---------------------------------------------------------------------------------------------------------------
class DskDeprecationWarning(DeprecationWarning):
    """A dsk API (a name in ``dsk.api``, a hook, a recipe key) that a later minor release removes."""


def warn_deprecated(old: str, replacement: str, *, since: str, removed_in: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated since dsk ``since`` and goes in ``removed_in``: use ``replacement``.

    dsk calls it wherever a deprecated API is used, so the warning points at the caller's line (``stacklevel``).
    pytest shows it in a plugin's test run; ``python -W error::dsk.api.DskDeprecationWarning`` makes it fail.
    """
    import warnings

    warnings.warn(
        f"{old} is deprecated since dsk {since} and will be removed in dsk {removed_in}: use {replacement}",
        DskDeprecationWarning,
        stacklevel=stacklevel,
    )


__all__ += ["DskDeprecationWarning", "warn_deprecated"]
