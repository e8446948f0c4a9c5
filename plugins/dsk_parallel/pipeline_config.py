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

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from dsk.api import BaseConfig

if TYPE_CHECKING:  # pragma: no cover
    from dsk.api import RunEstimate

#: model stages per pipeline rank of each schedule
STAGES_PER_RANK = {"1f1b": 1, "dualpipe": 1, "dualpipev": 2}

#: the schedule each implementation runs, so a pipeline registered under another name (a plugin re-registering
#: dsk's DualPipeV as "v", say) is checked as the schedule it is
_SCHEDULE_OF_IMPL = {
    "dsk_parallel.pipeline:OneFOneB": "1f1b",
    "dsk_parallel.pipeline:DualPipeV": "dualpipev",
    "dsk_parallel.pipeline:DualPipe": "dualpipe",
}


def schedule_of(slot: Any) -> str | None:
    """The schedule (a key of :data:`STAGES_PER_RANK`) of a resolved ``[parallel.<key>]`` pipeline slot: from its
    implementation, else its registered name; None for a pipeline class dsk does not know (it checks its own
    shapes when it is built)."""
    impl = getattr(slot, "impl", None)
    if isinstance(impl, str) and impl in _SCHEDULE_OF_IMPL:
        return _SCHEDULE_OF_IMPL[impl]
    kind = getattr(impl, "kind", None) if impl is not None and not isinstance(impl, str) else None
    if isinstance(kind, str) and kind in STAGES_PER_RANK:
        return kind
    name = getattr(slot, "name", None)
    return name if name in STAGES_PER_RANK else None


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

    #: the layout (pipeline ranks, stages per rank) is read by the other shares (the data ranks): set it first
    cost_share_phase: ClassVar[int] = -1

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """The stages each pipeline rank holds, the chunks' activations it keeps at its peak and the schedule's
        bubble (:class:`dsk.api.SharesCost`; see :func:`pipeline_share`)."""
        kind = next(
            (schedule_of(s) for s in (resolved.get("parallel") or {}).values() if getattr(s, "config", None) is self),
            None,
        )
        if kind is None:
            return
        model = resolved.get("model")
        pipeline_share(estimate, kind, self, tied=bool(getattr(model, "tie_embeddings", False)))


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


#: the per-chunk costs the bubble is computed with, in units of one stage's forward of one chunk
BUBBLE_COSTS = {"F": 1.0, "B": 2.0, "W": 1.0}


def even_split(n_layers: int, n_stages: int, layers_per_stage: list[int] | None = None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each stage: ``layers_per_stage``, else as even as possible with the earlier stages
    one layer longer (the split :func:`dsk.model.transformer.split_layers` makes when the pipeline cuts a model)."""
    sizes = list(layers_per_stage) if layers_per_stage is not None else [
        n_layers // n_stages + (1 if i < n_layers % n_stages else 0) for i in range(n_stages)
    ]  # fmt: skip
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def schedule_bubble(kind: str, pp: int, chunks: int, zero_bubble: bool = True) -> dict[str, Any]:
    """The idle fraction of a pipeline rank over one step, by the DualPipe paper's formulas (spec §3.8).

    Every stage costs the same, and per chunk F = 1 (a stage's forward), B = 2 (its full backward: input and
    weight gradients, two forwards' worth), W = 1 (the weight-gradient half, deferred by the zero-bubble steps;
    0 when nothing is deferred), F&B = F + B (an overlapped pair costs its two parts: dsk runs them one after the
    other). Idle time: 1F1B ``(PP - 1)(F + B)``; DualPipe and DualPipeV ``(S/2 - 1)(F&B + B - 3W)`` with S the
    model stages (PP for DualPipe, 2 PP for DualPipeV). Busy time: each chunk's F + B on each of the rank's
    stages it passes (one stage for 1F1B and DualPipe, two for DualPipeV). Fraction = idle / (idle + busy).
    """
    F, B, W = BUBBLE_COSTS["F"], BUBBLE_COSTS["B"], BUBBLE_COSTS["W"]
    if kind == "1f1b":
        idle, formula, w = (pp - 1) * (F + B), "(PP-1)(F+B)", 0.0
        busy = chunks * (F + B)
    else:
        stages = pp * STAGES_PER_RANK[kind]
        w = W if (zero_bubble or kind == "dualpipev") else 0.0
        idle = max(0.0, (stages / 2 - 1) * ((F + B) + B - 3 * w))
        formula = "(PP/2-1)(F&B+B-3W)" + (", PP = 2 x pp stages" if kind == "dualpipev" else "")
        busy = chunks * (F + B) * STAGES_PER_RANK[kind]
    return {
        "schedule": kind,
        "pp": pp,
        "chunks": chunks,
        "formula": formula,
        "costs": {"F": F, "B": B, "W": w, "F&B": F + B},
        "idle": idle,
        "busy": busy,
        "fraction": idle / (idle + busy),
    }


def pipeline_share(estimate: RunEstimate, kind: str, cfg: PipelineConfig, tied: bool = False) -> None:
    """Lay the model's parts out over the pipeline ranks as :class:`dsk_parallel.pipeline.Pipeline` does, with the
    chunks' activations each rank holds at the schedule's peak (the spec's §3.8 table, measured in
    ``bench/reference/pipeline-cpu.txt``), in units of one chunk's forward of one stage:

    * ``1f1b``: rank r runs stage r and holds ``pp - r`` chunks (measured: 2 and 1 at pp 2);
    * ``dualpipe``: rank r runs stages r and pp-1-r (every stage on two ranks, two copies of the parameters) and
      holds pp + 1 chunks, half of them on each stage (measured 2.87 at pp 2);
    * ``dualpipev``: rank r runs stages r and 2 pp-1-r of the 2 pp and holds 2 pp + 1 chunks of a stage, half on
      each (measured 4.6 and 5.0 at pp 2).

    Stage 0 holds the embedding; the last stage the final norm, the head and the MTP modules, with the embedding
    again when MTP or tied embeddings need it.
    """
    from dsk.api import RankStages, StageLoad

    pp = cfg.pp if cfg.pp is not None else estimate.world_size
    chunks = cfg.chunks if cfg.chunks is not None else min_chunks(kind, pp)
    layers = [p.name for p in estimate.parts if p.name.startswith("layers.")]
    n_stages = pp * STAGES_PER_RANK[kind]
    spans = even_split(len(layers), n_stages, cfg.layers_per_stage)
    names = {p.name for p in estimate.parts}

    def parts(s: int) -> list[str]:
        out = ["embed_tokens"] if s == 0 else []
        out += layers[spans[s][0] : spans[s][1]]
        if s == n_stages - 1:
            out += [n for n in ("norm", "lm_head", "mtp") if n in names]
            if ("mtp" in names or tied) and "embed_tokens" not in out:
                out.append("embed_tokens")
        return out

    ranks = []
    for r in range(pp):
        if kind == "1f1b":
            ranks.append(RankStages([StageLoad(parts(r), float(min(pp - r, chunks)))]))
        else:
            held = (pp + 1) / 2 if kind == "dualpipe" else (2 * pp + 1) / 2
            mirror = (pp if kind == "dualpipe" else 2 * pp) - 1 - r
            ranks.append(RankStages([StageLoad(parts(r), held), StageLoad(parts(mirror), held)]))
    estimate.pipeline_ranks, estimate.chunks, estimate.ranks = pp, chunks, ranks
    estimate.bubble = schedule_bubble(kind, pp, chunks, cfg.zero_bubble)
    estimate.notes["pipeline"] = (
        f"{kind}: pp {pp}, {chunks} chunks of {estimate.tokens_per_chunk:g} tokens; activations of "
        + {"1f1b": "pp - r chunks on rank r", "dualpipe": "pp + 1 chunks (two stages per rank)",
           "dualpipev": "2 pp + 1 chunks of a half stage (two per rank)"}[kind]
    )  # fmt: skip
