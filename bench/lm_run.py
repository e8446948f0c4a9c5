"""A set-up ``pretrain`` run of a recipe, in this process, for the benchmarks that time the trainer's own step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class _Quiet:
    """A console that prints nothing (the benchmarks print their own tables)."""

    is_terminal = False

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def lm_run(recipe: str, tmp: Path, overrides: Sequence[tuple[str, str]] = ()) -> Any:
    """``recipes/<recipe>`` with ``overrides`` (``("set" | "unset", text)`` in order) validated, built and set up
    as ``dsk train`` would (``dsk_trainers.lm._Run``), writing into ``tmp``; a strategy's ranks must already be up."""
    from dsk_trainers.lm import _Run

    from dsk.plugins import make_plugin_manager
    from dsk.recipe import load_recipe, validate_recipe
    from dsk.registry import build_registry
    from dsk.train.context import RunContext
    from dsk.train.metrics import MetricsWriter
    from dsk.train.progress import Reporter

    pm = make_plugin_manager()
    registry = build_registry(pm)
    loaded = load_recipe(str(ROOT / "recipes" / recipe), overrides=list(overrides))
    sections = validate_recipe(loaded, registry, pm, check=True).resolved
    ctx = RunContext(
        run_dir=tmp, sections=sections, registry=registry, pm=pm, metrics=MetricsWriter(tmp / "metrics.jsonl"),
        reporter=Reporter(_Quiet(), False), seed=sections["dsk"].seed,
    )  # fmt: skip
    run = _Run(sections["trainer"].build(), ctx)
    run.setup()
    return run
