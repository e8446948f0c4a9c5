"""The component registry: (kind, name) -> spec with a config model, a lazy implementation and its provider.

The registry is built from a plugin manager by calling each registration hook implementation itself,
so every record carries the plugin that registered it. It never imports an implementation until
``ComponentSpec.load()``; building it does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from dsk.api import KINDS, NoConfig, ResolvedSlot
from dsk.names import LookupFailed, did_you_mean, import_string

__all__ = [
    "HOOK_KINDS",
    "ComponentSpec",
    "LookupFailed",
    "Registrar",
    "Registry",
    "RegistryError",
    "build_registry",
    "spec_warnings",
    "did_you_mean",
    "import_string",
]

if TYPE_CHECKING:  # pragma: no cover
    from dsk.plugins import DskPluginManager

#: Which kinds each registration hook may register (a wrong kind fails at the call site).
HOOK_KINDS: dict[str, tuple[str, ...]] = {
    "register_model_components": ("attention", "ffn", "router", "mtp"),
    "register_features": ("feature",),
    "register_parallel_strategies": ("parallel",),
    "register_optimizers": ("optimizer",),
    "register_trainers": ("trainer",),
    "register_tasks": ("task", "tokenizer"),
    "register_rewards": ("reward",),
}


class RegistryError(Exception):
    """A registration call was wrong (bad kind, bad config model, alias clash)."""


@dataclass
class ComponentSpec:
    """One registered component."""

    kind: str
    name: str
    impl: Any
    config: type[BaseModel]
    summary: str
    provider: str
    distribution: str | None = None
    version: str | None = None
    aliases: tuple[str, ...] = ()
    #: features only: names of features this one must come after / before when both are on, and cannot run with
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    #: model components only: the dsk.api.HFAdapter mapping its config and weights to HF checkpoints
    #: (a lazy "module:attr" naming a class or an instance), or None when it has no HF form
    hf: Any = None

    @property
    def qualified(self) -> str:
        """``provider:name``, always unambiguous."""
        return f"{self.provider}:{self.name}"

    @property
    def impl_path(self) -> str:
        """The implementation as a ``module:attr`` string (for listings)."""
        if isinstance(self.impl, str):
            return self.impl
        return f"{getattr(self.impl, '__module__', '?')}:{getattr(self.impl, '__qualname__', repr(self.impl))}"

    def load(self) -> Any:
        """Import and return the implementation."""
        return import_string(self.impl) if isinstance(self.impl, str) else self.impl

    def hf_adapter(self) -> Any:
        """The component's ``dsk.api.HFAdapter`` (imported; a class is instantiated), or None when it has none."""
        if self.hf is None:
            return None
        adapter = import_string(self.hf) if isinstance(self.hf, str) else self.hf
        return adapter() if isinstance(adapter, type) else adapter


@dataclass
class Registry:
    """All components registered by the loaded plugins, keyed by (kind, name)."""

    specs: dict[tuple[str, str], list[ComponentSpec]] = field(default_factory=dict)
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    failed_plugins: list[str] = field(default_factory=list)

    # -- registration ------------------------------------------------------------------------------
    def add(self, spec: ComponentSpec) -> None:
        """Add a spec; a second provider of the same (kind, name) makes the name ambiguous, not an error."""
        key = (spec.kind, spec.name)
        if key in self.aliases:
            raise RegistryError(f"{spec.kind} '{spec.name}' clashes with an alias of {spec.kind} '{self.aliases[key]}'")
        self.specs.setdefault(key, []).append(spec)
        for alias in spec.aliases:
            akey = (spec.kind, alias)
            if akey in self.specs or akey in self.aliases:
                raise RegistryError(f"alias '{alias}' of {spec.kind} '{spec.name}' clashes with an existing name")
            self.aliases[akey] = spec.name

    # -- queries -----------------------------------------------------------------------------------
    def kinds(self) -> list[str]:
        """Kinds that have at least one component."""
        return sorted({k for k, _ in self.specs})

    def names(self, kind: str) -> list[str]:
        """Component names registered under ``kind``."""
        return sorted(n for k, n in self.specs if k == kind)

    def all(self, kind: str | None = None) -> Iterator[ComponentSpec]:
        """Every spec (of one kind), sorted by kind then name."""
        for (k, _n), specs in sorted(self.specs.items()):
            if kind is None or k == kind:
                yield from specs

    def hf_specs(self, kind: str) -> list[ComponentSpec]:
        """The specs of ``kind`` that declare an HF checkpoint adapter (``hf=`` at registration), sorted by name."""
        return [spec for spec in self.all(kind) if spec.hf is not None]

    def conflicts(self) -> list[tuple[str, str, list[str]]]:
        """(kind, name, providers) for every name registered by more than one plugin."""
        return [(k, n, [s.provider for s in v]) for (k, n), v in sorted(self.specs.items()) if len(v) > 1]

    def get(self, kind: str, name: str) -> ComponentSpec:
        """The spec for ``kind``/``name`` (``provider:name`` picks one of several providers).

        Raises:
            LookupFailed: unknown kind or name (with did-you-mean and a cross-kind hint) or an ambiguous name.
        """
        if kind not in KINDS and kind not in {k for k, _ in self.specs}:
            raise LookupFailed(f"unknown component kind '{kind}'", _suggest(kind, list(KINDS)))
        provider = None
        if ":" in name:
            provider, _, name = name.partition(":")
        name = self.aliases.get((kind, name), name)
        specs = self.specs.get((kind, name))
        if not specs:
            raise LookupFailed(f"unknown {kind} '{name}'", self._unknown_hint(kind, name))
        if provider is not None:
            chosen = [s for s in specs if s.provider == provider]
            if not chosen:
                have = ", ".join(s.provider for s in specs)
                raise LookupFailed(f"{kind} '{name}' is not provided by plugin '{provider}'", f"provided by: {have}")
            return chosen[0]
        if len(specs) > 1:
            who = " and ".join(f"'{s.provider}'" for s in specs)
            options = " or ".join(f'"{s.qualified}"' for s in specs)
            raise LookupFailed(
                f"{kind} '{name}' is provided by both {who}",
                f"write type = {options} to choose",
            )
        return specs[0]

    def _unknown_hint(self, kind: str, name: str) -> str:
        parts = []
        close = did_you_mean(name, self.names(kind) + [a for (k, a) in self.aliases if k == kind])
        if close:
            parts.append("did you mean " + " or ".join(f"'{c}'" for c in close) + "?")
        other = [k for (k, n) in self.specs if n == name and k != kind]
        if other:
            parts.append(f"'{name}' is a {other[0]}, not a {kind}")
        available = self.names(kind)
        if available and len(available) <= 12:
            parts.append(f"available {kind}s: {', '.join(available)}")
        elif not available:
            parts.append(f"no {kind} is registered; is the plugin that provides it installed and loaded?")
        if self.failed_plugins:
            parts.append(
                f"{len(self.failed_plugins)} plugin(s) failed to load ({', '.join(self.failed_plugins)}); "
                "run `dsk plugins` for details"
            )
        return "; ".join(parts)

    def resolve_slot(self, kind: str, table: dict[str, Any], default_type: str | None = None) -> ResolvedSlot:
        """Validate a slot table and return the resolved slot.

        Raises:
            dsk.recipe.errors.RecipeError: with every problem found (paths relative to the slot).
        """
        from dsk.recipe.errors import RecipeError
        from dsk.recipe.validate import validate_slot

        slot, problems = validate_slot(self, kind, table, path="", default_type=default_type)
        if problems or slot is None:
            raise RecipeError(problems)
        return slot

    def validate(self, model: type[BaseModel], table: dict[str, Any]) -> Any:
        """``model`` validated from a plain table whose slots are resolved against this registry.

        Raises:
            dsk.recipe.errors.RecipeError: with every problem found.
        """
        return model.model_validate(table, context={"registry": self})


def _suggest(name: str, candidates: list[str]) -> str | None:
    close = did_you_mean(name, candidates)
    return f"did you mean '{close[0]}'?" if close else None


class Registrar:
    """The ``register`` callback handed to one plugin's registration hook; it stamps the provider."""

    def __init__(self, registry: Registry, hook: str, provider: str, distribution: str | None, version: str | None):
        self.registry = registry
        self.hook = hook
        self.provider = provider
        self.distribution = distribution
        self.version = version

    def __call__(
        self,
        kind: str,
        name: str,
        impl: Any,
        *,
        config: type[BaseModel] | None = None,
        summary: str | None = None,
        aliases: tuple[str, ...] | list[str] = (),
        after: tuple[str, ...] | list[str] = (),
        before: tuple[str, ...] | list[str] = (),
        conflicts: tuple[str, ...] | list[str] = (),
        hf: Any = None,
    ) -> None:
        allowed = HOOK_KINDS.get(self.hook, ())
        if (after or before or conflicts) and kind != "feature":
            raise RegistryError(
                f"{kind} '{name}' from plugin '{self.provider}': after/before/conflicts are for features"
            )
        if hf is not None and self.hook != "register_model_components":
            raise RegistryError(f"{kind} '{name}' from plugin '{self.provider}': hf= is for model components")
        if kind not in allowed:
            owner = next((hook for hook, kinds in HOOK_KINDS.items() if kind in kinds), None)
            if owner is not None:
                fix = f"register it from {owner}"
            else:
                close = did_you_mean(kind, list(KINDS))
                fix = f"did you mean '{close[0]}'?" if close else f"the kinds are {', '.join(KINDS)}"
            raise RegistryError(
                f"plugin '{self.provider}' registered kind '{kind}' from {self.hook}; "
                f"that hook registers {', '.join(allowed)}: {fix}"
            )
        if not isinstance(name, str) or not name or ":" in name:
            raise RegistryError(f"plugin '{self.provider}' registered an invalid {kind} name {name!r}")
        config = config or NoConfig
        if not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise RegistryError(f"{kind} '{name}' from plugin '{self.provider}': config must be a pydantic model class")
        if summary is None:
            summary = _first_doc_line(impl) or _first_doc_line(config) or ""
        self.registry.add(
            ComponentSpec(
                kind=kind,
                name=name,
                impl=impl,
                config=config,
                summary=summary,
                provider=self.provider,
                distribution=self.distribution,
                version=self.version,
                aliases=tuple(aliases),
                after=tuple(after),
                before=tuple(before),
                conflicts=tuple(conflicts),
                hf=hf,
            )
        )


def spec_warnings(spec: ComponentSpec) -> list[str]:
    """What is wrong with a registration that still loads: said by ``dsk plugins`` for components outside dsk.

    Torch-free: the implementation's module is looked up (``find_spec``), never imported, so only its parent
    packages run.
    """
    import importlib.util

    out: list[str] = []
    where = f"{spec.kind}/{spec.name}"
    config = spec.config
    cname = config.__name__
    missing = [info.alias or n for n, info in config.model_fields.items() if info.is_required()]
    if missing:
        out.append(
            f"{where}: option{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} of {cname} "
            f"{'have' if len(missing) > 1 else 'has'} no default, so every recipe that uses it must set "
            f"{'them' if len(missing) > 1 else 'it'}; give each a default (Field(value, description=...)) unless "
            "that is intended"
        )
    if config.model_config.get("extra") != "forbid":
        out.append(
            f"{where}: {cname} accepts unknown keys, so a misspelled option in a recipe passes silently; "
            "subclass dsk.api.BaseConfig"
        )
    if isinstance(spec.impl, str):
        module, _, attr = spec.impl.partition(":")
        try:
            found = importlib.util.find_spec(module) is not None
        except Exception:  # a parent package that fails to import, or a malformed name
            found = False
        if not found or not attr:
            what = f"no module '{module}'" if not found else "it names no attribute (write 'package.module:Class')"
            out.append(f"{where}: implementation '{spec.impl}' cannot be loaded: {what}")
    return out


def _first_doc_line(obj: Any) -> str:
    if isinstance(obj, str):
        return ""
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def build_registry(pm: DskPluginManager) -> Registry:
    """Call every registration hook implementation (per plugin, so each record has its provider)."""
    registry = Registry(failed_plugins=[p.name for p in pm.failures()])
    for hook_name in HOOK_KINDS:
        caller = getattr(pm.hook, hook_name)
        # get_hookimpls() is in registration order (pluggy *calls* them last-first); keep registration order
        for impl in caller.get_hookimpls():
            info = pm.info_for(impl.plugin)
            registrar = Registrar(
                registry,
                hook_name,
                provider=impl.plugin_name,
                distribution=info.distribution if info else None,
                version=info.version if info else None,
            )
            kwargs = {"register": registrar} if "register" in impl.argnames else {}
            try:
                impl.function(**kwargs)
            except Exception as exc:  # a broken registration must not break the CLI
                registry.errors.append(f"plugin '{impl.plugin_name}' failed in {hook_name}: {exc}")
                pm.mark_failed(impl.plugin_name, f"{hook_name}: {type(exc).__name__}: {exc}")
    registry.failed_plugins = [p.name for p in pm.failures()]
    return registry
