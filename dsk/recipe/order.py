"""The order features apply in: their declared ``after``/``before`` constraints, recipe order as the tie-break.

Torch-free: recipe validation reports a cycle or a conflict with the key path, and the build path applies the
features in the order computed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dsk.api import Problem

__all__ = ["FeatureEntry", "order_features"]


@dataclass(frozen=True)
class FeatureEntry:
    """One enabled feature of a recipe: its key (``[features.<key>]``), registered name and declared order."""

    key: str
    name: str
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()


def order_features(entries: Sequence[FeatureEntry], prefix: str = "features") -> tuple[list[str], list[Problem]]:
    """The feature keys in application order, and the problems (cycles, conflicts) with their key paths.

    ``a.after = ("b",)`` puts a after b when both are on (``before`` is the converse); names that are not on are
    ignored, so a feature can order itself against optional ones. Among features the constraints leave free, the
    recipe's order is kept (a stable topological sort).
    """
    problems: list[Problem] = []
    by_name: dict[str, list[FeatureEntry]] = {}
    for e in entries:
        by_name.setdefault(e.name, []).append(e)
    for i, e in enumerate(entries):
        for o in entries[:i]:
            if o.name in e.conflicts or e.name in o.conflicts:
                problems.append(
                    Problem(
                        f"{prefix}.{e.key}",
                        f"feature '{e.name}' cannot run together with feature '{o.name}' ([{prefix}.{o.key}])",
                        f"turn one of them off, e.g. --set {prefix}.{e.key}.enabled=false",
                    )
                )
    # edges: u -> v means u applies before v
    keys = [e.key for e in entries]
    succ: dict[str, set[str]] = {k: set() for k in keys}
    for e in entries:
        for name in e.after:
            for o in by_name.get(name, []):
                if o.key != e.key:
                    succ[o.key].add(e.key)
        for name in e.before:
            for o in by_name.get(name, []):
                if o.key != e.key:
                    succ[e.key].add(o.key)
    indegree = {k: 0 for k in keys}
    for k in keys:
        for v in succ[k]:
            indegree[v] += 1
    ordered: list[str] = []
    ready = [k for k in keys if indegree[k] == 0]
    while ready:
        ready.sort(key=keys.index)
        k = ready.pop(0)
        ordered.append(k)
        for v in succ[k]:
            indegree[v] -= 1
            if indegree[v] == 0:
                ready.append(v)
    if len(ordered) < len(keys):
        stuck = [k for k in keys if k not in ordered]
        cycle = " -> ".join(stuck + [stuck[0]])
        problems.append(
            Problem(
                f"{prefix}.{stuck[0]}",
                f"the features' declared order has a cycle ({cycle}): no order satisfies every after/before",
                "turn one of them off, or ask their authors which order is meant",
            )
        )
        ordered += stuck
    return ordered, problems
