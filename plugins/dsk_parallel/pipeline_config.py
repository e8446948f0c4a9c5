"""Config model of pipeline parallelism (torch-free).

::

    [parallel.pipeline]
    type = "dualpipe"         # or "dualpipev", "1f1b"
    pp = 2                    # pipeline ranks (default: every rank); the rest of the world is data parallel
    chunks = 4                # micro-batches each trainer micro-batch is cut into (default: the fewest allowed)
    layers_per_stage = [4, 4] # layers of each model stage (default: as even as possible)

The model is cut into stages: ``pp`` of them for ``1f1b`` and ``dualpipe``, ``2 * pp`` for ``dualpipev``. World =
``pp`` x DP, pipeline outermost (rank = pp_rank * DP + dp_rank), so a pipeline stage's data-parallel and
expert-parallel groups are consecutive ranks, as DeepSeek-V3 lays them out.
"""

from __future__ import annotations

from pydantic import Field

from dsk.api import BaseConfig

#: model stages per pipeline rank of each schedule
STAGES_PER_RANK = {"1f1b": 1, "dualpipe": 1, "dualpipev": 2}


class PipelineConfig(BaseConfig):
    """``[parallel.<key>] type = "dualpipev" | "dualpipe" | "1f1b"``: the model cut into stages over ranks."""

    pp: int | None = Field(
        None,
        ge=1,
        description="pipeline-parallel ranks (default: every rank); the world must be pp x the data-parallel ranks",
    )
    chunks: int | None = Field(
        None,
        ge=1,
        description="micro-batches (chunks) each trainer micro-batch is cut into along its rows (default: the "
        "fewest the schedule allows: pp for 1f1b, 2 x pp for dualpipe and dualpipev)",
    )
    layers_per_stage: list[int] | None = Field(
        None,
        description="transformer layers of each model stage, in order (pp entries, 2 x pp for dualpipev; they must "
        "sum to model.n_layers; default: as even as possible, earlier stages one layer longer)",
    )
    zero_bubble: bool = Field(
        True,
        description="dualpipe: defer the weight gradients of the backward chunks the schedule marks (the "
        "zero-bubble W steps); dualpipev always splits them (torch's schedule), 1f1b never does",
    )


def min_chunks(kind: str, pp: int) -> int:
    """The fewest micro-batches a schedule of ``pp`` ranks runs (torch's 1F1B: one per stage; DualPipe and
    DualPipeV: two per stage of a rank's pair, 2 x pp)."""
    return pp if kind == "1f1b" else 2 * pp


def pipeline_problems(
    kind: str, key: str, pp: int, chunks: int | None, layers_per_stage: list[int] | None, n_layers: int | None
) -> list[tuple[str, str]]:
    """The impossible shapes of a pipeline, as ``(dotted key, message)`` pairs (empty when it can run).

    Args:
        kind: the schedule (``1f1b``, ``dualpipe``, ``dualpipev``).
        key: the ``[parallel.<key>]`` table's key.
        pp: pipeline ranks.
        chunks: ``parallel.<key>.chunks`` (None: the default, always allowed).
        layers_per_stage: ``parallel.<key>.layers_per_stage`` (None: even).
        n_layers: ``model.n_layers`` (None: unknown yet).
    """
    where = f"parallel.{key}"
    out: list[tuple[str, str]] = []
    stages = pp * STAGES_PER_RANK[kind]
    if kind == "dualpipe" and pp % 2:
        out.append((f"{where}.pp", f"{where}.pp = {pp}: DualPipe runs on an even number of pipeline ranks (each "
                    "rank pairs with rank pp-1-r)"))  # fmt: skip
    if chunks is not None:
        least = min_chunks(kind, pp)
        if chunks < least:
            out.append((f"{where}.chunks", f"{where}.chunks = {chunks}: {kind} at pp = {pp} needs at least {least} "
                        "micro-batches"))  # fmt: skip
        elif kind == "dualpipe" and chunks % 2:
            out.append((f"{where}.chunks", f"{where}.chunks = {chunks}: DualPipe feeds half the micro-batches from "
                        "each end, so it needs an even number"))  # fmt: skip
    if layers_per_stage is not None:
        if len(layers_per_stage) != stages:
            out.append((f"{where}.layers_per_stage", f"{where}.layers_per_stage has {len(layers_per_stage)} "
                        f"entries; {kind} at pp = {pp} cuts the model into {stages} stages"))  # fmt: skip
        elif min(layers_per_stage) < 1:
            out.append((f"{where}.layers_per_stage", f"{where}.layers_per_stage = {layers_per_stage}: every stage "
                        "needs at least one layer"))  # fmt: skip
        elif n_layers is not None and sum(layers_per_stage) != n_layers:
            out.append((f"{where}.layers_per_stage", f"{where}.layers_per_stage = {layers_per_stage} sums to "
                        f"{sum(layers_per_stage)}, but model.n_layers = {n_layers}"))  # fmt: skip
    elif n_layers is not None and n_layers < stages:
        out.append(("model.n_layers", f"model.n_layers = {n_layers} cannot be cut into the {stages} stages of "
                    f"{kind} at {where}.pp = {pp} (one layer at least per stage)"))  # fmt: skip
    return out
