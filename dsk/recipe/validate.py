"""Recipe validation: every slot checked against its component's config model, every problem collected.

Phase 1 walks the known sections and resolves each slot's ``type`` through the registry; phase 2
validates each slot's table with the component's pydantic model (nested slots recursively); phase 3
asks plugins for cross-component problems (``validate_recipe`` hook). Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from dsk.api import Problem, ResolvedSlot, slot_kind
from dsk.names import LookupFailed, did_you_mean
from dsk.recipe.errors import RecipeError, join
from dsk.recipe.load import Recipe, merge_into
from dsk.recipe.order import FeatureEntry, order_features
from dsk.recipe.schema import (
    DEFAULT_OPTIMIZER,
    SECTIONS,
    STAGE_SECTIONS,
    CheckpointConfig,
    DskMeta,
    LoggingConfig,
)

if TYPE_CHECKING:  # pragma: no cover
    from dsk.plugins import DskPluginManager
    from dsk.registry import Registry


def _type_name(value: Any) -> str:
    return {dict: "table", list: "array", str: "string", bool: "boolean", int: "integer", float: "float"}.get(
        type(value), type(value).__name__
    )


def _field_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _pydantic_problem(err: dict[str, Any], path: str, model: type[BaseModel], what: str) -> Problem:
    loc = err.get("loc", ())
    full = path
    for part in loc:
        full = join(full, part)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        close = did_you_mean(key, _field_keys(model))
        hint = f"did you mean '{close[0]}'?" if close else f"valid options: {', '.join(_field_keys(model)) or 'none'}"
        return Problem(full, f"unknown option '{key}' for {what}", hint)
    if kind == "missing":
        return Problem(full, f"required option missing for {what}")
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if "input" in err and kind not in ("model_type", "dict_type") and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return Problem(full, msg)


def validate_config(
    registry: Registry, model: type[BaseModel], table: Any, path: str, what: str
) -> tuple[BaseModel | None, list[Problem]]:
    """Validate ``table`` against ``model``; nested slot fields are resolved and validated recursively."""
    if not isinstance(table, dict):
        return None, [Problem(path, f"expected a table for {what}, got {_type_name(table)} {table!r}")]
    problems: list[Problem] = []
    prepared = dict(table)
    failed_keys: set[str] = set()
    for name, info in model.model_fields.items():
        key = info.alias or name
        marker = slot_kind(info)
        if marker is None or key not in prepared:
            continue
        kind, default, is_map = marker
        raw = prepared[key]
        if is_map:
            if not isinstance(raw, dict):
                problems.append(Problem(join(path, key), f"expected a table of {kind} slots, got {_type_name(raw)}"))
                failed_keys.add(key)
                continue
            resolved_map: dict[str, ResolvedSlot] = {}
            for sub, sub_table in raw.items():
                slot, probs = validate_slot(registry, kind, sub_table, join(join(path, key), sub), default_type=sub)
                problems.extend(probs)
                if slot is not None:
                    resolved_map[sub] = slot
            if len(resolved_map) != len(raw):
                failed_keys.add(key)
            prepared[key] = resolved_map
            continue
        if raw is None:
            continue
        slot, probs = validate_slot(registry, kind, raw, join(path, key), default_type=default)
        problems.extend(probs)
        if slot is None:
            failed_keys.add(key)
            prepared.pop(key)
        else:
            prepared[key] = slot
    try:
        instance = model.model_validate(prepared, context={"registry": registry})
    except ValidationError as exc:
        for err in exc.errors():
            loc = err.get("loc", ())
            if loc and str(loc[0]) in failed_keys:
                continue  # already reported at the nested slot
            problems.append(_pydantic_problem(err, path, model, what))
        return None, problems
    except Exception as exc:  # a validator in a plugin's config raised something unexpected
        return None, problems + [Problem(path, f"{what}: {type(exc).__name__}: {exc}")]
    return (instance if not problems else None), problems


def validate_slot(
    registry: Registry, kind: str, table: Any, path: str, default_type: str | None = None
) -> tuple[ResolvedSlot | None, list[Problem]]:
    """Resolve a slot table (``{"type": name, **options}``, or a bare name) and validate its options."""
    if isinstance(table, str):
        table = {"type": table}
    if not isinstance(table, dict):
        return None, [Problem(path, f"expected a table with 'type' for a {kind}, got {_type_name(table)} {table!r}")]
    name = table.get("type", default_type)
    if name is None:
        names = registry.names(kind)
        hint = f"available {kind}s: {', '.join(names)}" if names else None
        return None, [Problem(join(path, "type"), f"missing 'type': which {kind} to use", hint)]
    if not isinstance(name, str):
        return None, [Problem(join(path, "type"), f"'type' must be a string naming a {kind}, got {_type_name(name)}")]
    try:
        spec = registry.get(kind, name)
    except LookupFailed as exc:
        where = join(path, "type") if "type" in table else path
        return None, [Problem(where, exc.message, exc.hint)]
    options = {k: v for k, v in table.items() if k != "type"}
    config, problems = validate_config(registry, spec.config, options, path, f"{kind} '{spec.name}'")
    if config is None:
        return None, problems
    return ResolvedSlot(kind=kind, name=spec.name, config=config, impl=spec.impl, provider=spec.provider), problems


def _optimizer_type(raw: Any) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("type"), str):
        return raw["type"]
    return raw if isinstance(raw, str) else DEFAULT_OPTIMIZER


def _moved_optimizer_keys(
    registry: Registry, trainer: dict[str, Any], optimizer: Any, path: str
) -> tuple[dict[str, Any], list[Problem]]:
    """Schema 1 recipes set the optimizer in [trainer]: name each such key and where it moved (and drop it)."""
    name = trainer.get("type")
    try:
        trainer_fields = set(_field_keys(registry.get("trainer", name).config)) if isinstance(name, str) else set()
        optim_fields = set(_field_keys(registry.get("optimizer", _optimizer_type(optimizer)).config))
    except LookupFailed:
        return trainer, []
    moved = [k for k in trainer if k != "type" and k not in trainer_fields and k in optim_fields]
    problems = [
        Problem(
            join(path, k),
            f"'{k}' moved from [trainer] to [optimizer] in recipe schema 2",
            f"write it as [optimizer] {k} = {json.dumps(trainer[k])}",
        )
        for k in moved
    ]
    return {k: v for k, v in trainer.items() if k not in moved}, problems


def _validate_optimizer(
    registry: Registry, raw: Any, trainer: ResolvedSlot | None, prefix: str
) -> tuple[ResolvedSlot | None, list[Problem]]:
    """The [optimizer] slot; the trainer's declared defaults (``optimizer_defaults``) lie under the recipe's keys."""
    path = join(prefix, "optimizer")
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        return None, [Problem(path, f"expected a table for [optimizer], got {_type_name(raw)} {raw!r}")]
    table = dict(raw)
    defaults = getattr(type(trainer.config), "optimizer_defaults", None) if trainer is not None else None
    if defaults:
        try:
            fields = set(_field_keys(registry.get("optimizer", _optimizer_type(raw)).config))
        except LookupFailed:
            fields = set()
        table = {**{k: v for k, v in defaults.items() if k in fields}, **table}
    return validate_slot(registry, "optimizer", table, path, default_type=DEFAULT_OPTIMIZER)


@dataclass
class ValidatedRecipe:
    """A recipe whose every section was validated; ``resolved`` holds config objects and resolved slots."""

    recipe: Recipe
    resolved: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    stages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _model_config_class() -> type[BaseModel]:
    from dsk.model.config import ModelConfig

    return ModelConfig


def _validate_sections(registry: Registry, data: dict[str, Any], prefix: str) -> tuple[dict[str, Any], list[Problem]]:
    problems: list[Problem] = []
    resolved: dict[str, Any] = {}
    allowed = SECTIONS if not prefix else {k: SECTIONS[k] for k in STAGE_SECTIONS}
    for key in data:
        if prefix and key == "name":
            continue
        if key not in allowed:
            close = did_you_mean(key, list(allowed))
            hint = f"did you mean '{close[0]}'?" if close else f"sections: {', '.join(allowed)}"
            problems.append(Problem(join(prefix, key), f"unknown section '{key}'", hint))

    def section(key: str) -> Any:
        return data.get(key)

    def add(key: str, value: Any, probs: list[Problem]) -> None:
        problems.extend(probs)
        resolved[key] = value

    if not prefix:
        meta, probs = validate_config(registry, DskMeta, section("dsk") or {}, "dsk", "[dsk]")
        add("dsk", meta, probs)
    if section("model") is not None:
        cfg, probs = validate_config(
            registry, _model_config_class(), section("model"), join(prefix, "model"), "[model]"
        )
        add("model", cfg, probs)
    raw_trainer = section("trainer")
    if isinstance(raw_trainer, dict):
        raw_trainer, moved = _moved_optimizer_keys(registry, raw_trainer, section("optimizer"), join(prefix, "trainer"))
        problems.extend(moved)
    for key, kind, default in (
        ("data", "task", None),
        ("tokenizer", "tokenizer", "char"),
        ("trainer", "trainer", None),
    ):
        raw = raw_trainer if key == "trainer" else section(key)
        if raw is None:
            if default is not None and not prefix:
                slot, probs = validate_slot(registry, kind, {}, key, default_type=default)
                add(key, slot, [p for p in probs if "unknown" not in p.message])
            continue
        slot, probs = validate_slot(registry, kind, raw, join(prefix, key), default_type=default)
        add(key, slot, probs)
    wants_optimizer = resolved.get("trainer") is not None and bool(registry.names("optimizer"))
    if wants_optimizer or section("optimizer") is not None:
        slot, probs = _validate_optimizer(registry, section("optimizer"), resolved.get("trainer"), prefix)
        add("optimizer", slot, probs)
    for key, kind in (("features", "feature"), ("parallel", "parallel")):
        raw = section(key)
        if raw is None:
            continue
        path = join(prefix, key)
        if not isinstance(raw, dict):
            problems.append(Problem(path, f"expected a table of [{key}.<name>] tables, got {_type_name(raw)}"))
            continue
        slots: dict[str, ResolvedSlot] = {}
        for name, table in raw.items():
            sub_path = join(path, name)
            if isinstance(table, dict) and "enabled" in table:
                enabled = table["enabled"]
                if not isinstance(enabled, bool):
                    problems.append(Problem(join(sub_path, "enabled"), f"must be true or false, got {enabled!r}"))
                    continue
                table = {k: v for k, v in table.items() if k != "enabled"}
                if not enabled:
                    continue
            slot, probs = validate_slot(registry, kind, table, sub_path, default_type=name)
            problems.extend(probs)
            if slot is not None:
                slots[name] = slot
        if key == "features" and slots:
            # features are kept in the order they apply (declared after/before, recipe order otherwise)
            entries = []
            for name, slot in slots.items():
                spec = registry.get("feature", f"{slot.provider}:{slot.name}" if slot.provider else slot.name)
                entries.append(FeatureEntry(name, slot.name, spec.after, spec.before, spec.conflicts))
            order, probs = order_features(entries, path)
            problems.extend(probs)
            slots = {name: slots[name] for name in order}
        resolved[key] = slots
    for key, model in (("checkpoint", CheckpointConfig), ("logging", LoggingConfig)):
        if section(key) is not None or not prefix:
            cfg, probs = validate_config(registry, model, section(key) or {}, join(prefix, key), f"[{key}]")
            add(key, cfg, probs)
    if section("plugins") is not None:
        raw = section("plugins")
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            problems.append(Problem(join(prefix, "plugins"), "expected [plugins.<plugin-name>] tables"))
        else:
            resolved["plugins"] = raw
    return resolved, problems


def validate_recipe(
    recipe: Recipe,
    registry: Registry,
    pm: DskPluginManager | None = None,
    *,
    require: tuple[str, ...] = (),
    check: bool = False,
) -> ValidatedRecipe:
    """Validate a loaded recipe and collect every problem.

    Args:
        recipe: the merged recipe from :func:`dsk.recipe.load_recipe`.
        registry: the component registry.
        pm: plugin manager for the ``validate_recipe`` hook (cross-component checks).
        require: sections that must be present (``train`` requires ``model`` and ``trainer``).
        check: raise :class:`RecipeError` when any problem is found.
    """
    data = recipe.data
    base = {k: v for k, v in data.items() if k != "stages"}
    resolved, problems = _validate_sections(registry, base, "")
    stages: list[tuple[str, dict[str, Any]]] = []
    raw_stages = data.get("stages")
    if raw_stages is not None:
        if not isinstance(raw_stages, list) or not all(isinstance(s, dict) for s in raw_stages):
            problems.append(Problem("stages", "expected [[stages]] tables (an array of tables)"))
        else:
            seen: set[str] = set()
            base_problems = set(problems)
            for i, stage in enumerate(raw_stages):
                path = f"stages[{i}]"
                name = stage.get("name")
                if not isinstance(name, str) or not name:
                    problems.append(Problem(join(path, "name"), "every stage needs a name (a non-empty string)"))
                    name = f"stage{i}"
                elif name in seen:
                    problems.append(Problem(join(path, "name"), f"duplicate stage name '{name}'"))
                seen.add(name)
                for key in stage:
                    if key != "name" and key not in STAGE_SECTIONS:
                        close = did_you_mean(key, list(STAGE_SECTIONS))
                        hint = (
                            f"did you mean '{close[0]}'?" if close else f"a stage may set: {', '.join(STAGE_SECTIONS)}"
                        )
                        problems.append(Problem(join(path, key), f"unknown section '{key}' in stage '{name}'", hint))
                overlay = {k: v for k, v in stage.items() if k in STAGE_SECTIONS}
                stage_resolved, merged_problems = _validate_sections(registry, _merge_stage(base, overlay), "")
                for p in merged_problems:
                    if p in base_problems:
                        continue  # the base recipe's own problem, reported once
                    top = p.path.split(".")[0].split("[")[0]
                    where = f"{path}.{p.path}" if top in overlay else f"{p.path} (in stage '{name}')"
                    problems.append(Problem(where, p.message, p.hint))
                stages.append((name, stage_resolved))
    for key in require:
        if key == "trainer" and stages:
            continue
        if resolved.get(key) is None and not any(p.path.split(".")[0] == key for p in problems):
            problems.append(Problem(key, f"missing [{key}] section", f"this command needs [{key}]: {SECTIONS[key]}"))
    if pm is not None and not problems:
        problems.extend(_plugin_problems(pm, data, resolved, registry))
    result = ValidatedRecipe(recipe=recipe, resolved=resolved, problems=problems, stages=stages)
    if check and problems:
        raise RecipeError(problems, source=recipe.source)
    return result


def _merge_stage(base: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    import copy

    merged = copy.deepcopy(base)
    overlay = {k: v for k, v in stage.items() if k != "name"}
    if "optimizer" in overlay:
        # a stage is a new training phase: its [optimizer] (rate, schedule) replaces the base one rather than
        # inheriting keys of it (a base min_lr above an RL stage's lr would otherwise reject the stage)
        merged.pop("optimizer", None)
    merge_into(merged, overlay, {}, "stage")
    return merged


def _plugin_problems(pm: DskPluginManager, data: dict[str, Any], resolved: dict[str, Any], registry: Registry):
    out: list[Problem] = []
    for impl in pm.hook.validate_recipe.get_hookimpls():
        kwargs = {"recipe": data, "resolved": resolved, "registry": registry}
        try:
            result = impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
        except Exception as exc:
            out.append(Problem("", f"plugin '{impl.plugin_name}' failed while validating: {type(exc).__name__}: {exc}"))
            continue
        for p in result or []:
            out.append(p if isinstance(p, Problem) else Problem("", str(p)))
    return out
