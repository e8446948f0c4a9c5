"""The plugin manager: fault-tolerant loading of entry-point and local plugins.

Built-in plugins are entry points of the ``dsk`` distribution in the ``dsk`` group, loaded exactly as
third-party ones are. A plugin that fails to import, implements an unknown hook, or whose hook
signature does not match the spec is recorded as failed (with a did-you-mean for misspelled hooks) and
every command keeps working.

Environment:
    DSK_LOAD_PLUGINS     comma list of plugin or distribution names to load (allow-list, applied before
                         import); set but empty loads no entry-point plugin.
    DSK_DISABLE_PLUGINS  comma list of plugin or distribution names never to load.
    DSK_STRICT_PLUGINS   "1" re-raises the first loading error (for plugin CI).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from dsk import hookspecs

ENTRY_POINT_GROUP = "dsk"


@dataclass
class PluginInfo:
    """What dsk knows about one plugin: where it came from and whether it loaded."""

    name: str
    module: str = ""
    distribution: str | None = None
    version: str | None = None
    entry_point: str | None = None
    status: str = "loaded"  # loaded | failed | blocked | incompatible
    error: str | None = None
    load_ms: float = 0.0
    plugin: Any = field(default=None, repr=False)

    def to_json(self, pm: DskPluginManager | None = None) -> dict[str, Any]:
        hooks = sorted(h.name for h in pm.get_hookcallers(self.plugin) or []) if pm and self.plugin is not None else []
        return {
            "name": self.name,
            "version": self.version,
            "distribution": self.distribution,
            "entry_point": self.entry_point,
            "module": self.module,
            "status": self.status,
            "error": self.error,
            "hooks": hooks,
            "load_ms": round(self.load_ms, 1),
        }


class PluginLoadError(Exception):
    """Raised in strict mode (DSK_STRICT_PLUGINS=1) when a plugin fails to load."""


class DskPluginManager(pluggy.PluginManager):
    """A pluggy manager that keeps its own record of plugins, distributions and failures."""

    def __init__(self) -> None:
        super().__init__("dsk")
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.strict = os.environ.get("DSK_STRICT_PLUGINS", "") == "1"

    # -- records -----------------------------------------------------------------------------------
    def info_for(self, plugin: Any) -> PluginInfo | None:
        name = self.get_name(plugin)
        return self.infos.get(name) if name else None

    def failures(self) -> list[PluginInfo]:
        return [i for i in self.infos.values() if i.status == "failed"]

    def incompatible(self) -> list[PluginInfo]:
        """Plugins built for a dsk version this is not (not imported)."""
        return [i for i in self.infos.values() if i.status == "incompatible"]

    def mark_failed(self, name: str, error: str) -> None:
        """Record a failure for ``name`` and unregister it so its hooks never run again."""
        info = self.infos.setdefault(name, PluginInfo(name=name))
        info.status, info.error = "failed", error
        plugin = self.get_plugin(name)
        if plugin is not None:
            self.unregister(plugin)
        info.plugin = None
        if self.strict:
            raise PluginLoadError(f"plugin '{name}' failed: {error}")

    # -- loading -----------------------------------------------------------------------------------
    def register_plugin(self, plugin: Any, name: str, **info: Any) -> bool:
        """Register one plugin object or module; on a signature mismatch record it as failed."""
        info.setdefault("module", getattr(plugin, "__name__", type(plugin).__name__))
        record = PluginInfo(name=name, **info)
        self.infos[name] = record
        try:
            self.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            self.mark_failed(name, f"{type(exc).__name__}: {exc}")
            return False
        record.plugin = plugin
        return self._check_unknown_hooks(name, plugin)

    def _check_unknown_hooks(self, name: str, plugin: Any) -> bool:
        """Fail a plugin that implements a hook no spec defines (pluggy ignores those silently)."""
        from dsk.names import did_you_mean

        spec_names = [n for n in dir(hookspecs) if not n.startswith("_") and callable(getattr(hookspecs, n))]
        spec_names = [n for n in spec_names if hasattr(getattr(hookspecs, n), "dsk_spec")]
        for caller in self.get_hookcallers(plugin) or []:
            if not caller.has_spec():
                close = did_you_mean(caller.name, spec_names)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.mark_failed(name, f"implements unknown hook '{caller.name}'{hint}")
                return False
        return True

    def load_module(self, target: str) -> bool:
        """Load a local plugin given as a ``path/to/file.py`` or an importable module name."""
        started = time.perf_counter()
        path = Path(target)
        name = path.stem if target.endswith(".py") else target
        try:
            if target.endswith(".py"):
                if not path.is_file():
                    raise FileNotFoundError(f"plugin file not found: {target}")
                spec = importlib.util.spec_from_file_location(f"dsk_local_plugin_{path.stem}", path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(target)
        except Exception as exc:
            self.infos[name] = PluginInfo(name=name, module=target, entry_point=None)
            self.mark_failed(name, f"import: {type(exc).__name__}: {exc}")
            return False
        ok = self.register_plugin(module, name=name, entry_point=f"--plugin {target}")
        self.infos[name].load_ms = (time.perf_counter() - started) * 1000
        return ok

    def load_entrypoints(self, allow: set[str] | None, block: set[str]) -> None:
        """Load every plugin of the ``dsk`` entry-point group, skipping blocked ones before import."""
        for dist in _distributions():
            dist_name = dist.metadata["Name"]
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or ep.name in self.infos:
                    continue
                names = {ep.name, dist_name}
                info = dict(distribution=dist_name, version=dist.version, entry_point=f"{ep.name} = {ep.value}")
                if names & block or (allow is not None and not names & allow):
                    self.infos[ep.name] = PluginInfo(name=ep.name, module=ep.value, status="blocked", **info)
                    continue
                incompatible = incompatibility(dist)
                if incompatible is not None:  # built for another dsk: not imported (docs/versioning.md)
                    self.infos[ep.name] = PluginInfo(
                        name=ep.name, module=ep.value, status="incompatible", error=incompatible, **info
                    )
                    continue
                started = time.perf_counter()
                try:
                    module = ep.load()
                except Exception as exc:  # any import failure is recorded, never fatal
                    self.infos[ep.name] = PluginInfo(name=ep.name, module=ep.value, **info)
                    self.mark_failed(ep.name, f"import: {type(exc).__name__}: {exc}")
                    continue
                self.register_plugin(module, name=ep.name, **info)
                self.infos[ep.name].load_ms = (time.perf_counter() - started) * 1000


def incompatibility(dist: md.Distribution) -> str | None:
    """Why the plugin distribution ``dist`` cannot run on this dsk, or None when it can.

    A plugin declares the dsk versions it supports as a requirement on ``dsk`` in its package metadata
    (``dependencies = ["dsk>=0.1,<0.2"]`` in its pyproject.toml). A requirement that excludes the running
    ``dsk.__version__`` (pre-releases included) makes it incompatible; no requirement on dsk means any version.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    from dsk._version import __version__

    if (dist.metadata["Name"] or "").lower() == "dsk":
        return None
    for line in dist.requires or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.lower() != "dsk" or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        if req.specifier and not req.specifier.contains(__version__, prereleases=True):
            return (
                f"built for dsk{req.specifier} and this is dsk {__version__}: install a release of "
                f"{dist.metadata['Name']} made for dsk {__version__}, or the dsk it names"
            )
    return None


def _distributions() -> list[md.Distribution]:
    seen: set[str] = set()
    out = []
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and name not in seen:  # a package visible twice on sys.path is loaded once
            seen.add(name)
            out.append(dist)
    return out


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


def make_plugin_manager(
    *,
    entrypoints: bool = True,
    allow: set[str] | None = None,
    plugins: list[Any] | tuple[Any, ...] = (),
    local: list[str] | tuple[str, ...] = (),
) -> DskPluginManager:
    """Build a fresh plugin manager.

    Args:
        entrypoints: load the ``dsk`` entry-point group (built-ins and installed third-party plugins),
            honouring DSK_LOAD_PLUGINS / DSK_DISABLE_PLUGINS.
        allow: an allow-list that replaces DSK_LOAD_PLUGINS (tests pass ``{"dsk"}`` for built-ins only).
        plugins: plugin objects or modules to register in-process (tests); names from ``__name__``.
        local: ``--plugin`` values: paths to ``.py`` files or module names.
    """
    pm = DskPluginManager()
    if entrypoints:
        pm.load_entrypoints(
            allow=allow if allow is not None else _env_list("DSK_LOAD_PLUGINS"),
            block=_env_list("DSK_DISABLE_PLUGINS") or set(),
        )
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register_plugin(plugin, name=name)
    for target in local:
        pm.load_module(target)
    return pm
