"""Recipe checks of pipeline parallelism (torch-free): the shapes a schedule cannot run, with their key paths.

Registered by ``dsk_parallel.plugin``. What the recipe alone shows is reported here; what needs the process count
(``pp`` left to its default, a world that is not pp x DP) is checked when the run is built
(:meth:`dsk_parallel.pipeline.Pipeline.setup`).
"""

from __future__ import annotations

from typing import Any

from dsk import hookimpl
from dsk_parallel.pipeline_config import PipelineConfig, min_chunks, pipeline_problems, schedule_of

#: trainers whose step runs through BuiltRun.forward_backward (the pipeline's schedule)
PIPELINED_TRAINERS = ("pretrain", "sft")


def pipeline_recipe_problems(resolved: dict[str, Any]) -> list[Any]:
    """The :class:`dsk.api.Problem` list of every pipeline ``[parallel.<key>]`` table of a recipe."""
    from dsk.api import Problem

    problems = []
    parallel = resolved.get("parallel") or {}
    model = resolved.get("model")
    n_layers = getattr(model, "n_layers", None)
    trainer = resolved.get("trainer")
    for key, slot in parallel.items():
        cfg = getattr(slot, "config", None)
        if not isinstance(cfg, PipelineConfig):
            continue
        kind = schedule_of(slot)
        if kind is None:  # a pipeline class dsk does not know checks its own shapes when it is built
            continue
        if cfg.pp is not None:
            for path, message in pipeline_problems(kind, key, cfg.pp, cfg.chunks, cfg.layers_per_stage, n_layers):
                problems.append(Problem(path, message, f"see dsk list parallel; {kind} cuts the model over pp ranks"))
            chunks = cfg.chunks if cfg.chunks is not None else min_chunks(kind, cfg.pp)
            batch = getattr(getattr(trainer, "config", None), "batch_size", None)
            if isinstance(batch, int) and batch % chunks:
                problems.append(
                    Problem(
                        "trainer.batch_size",
                        f"trainer.batch_size = {batch} does not cut into parallel.{key}.chunks = {chunks} equal "
                        "chunks (the stages exchange activations of one shape)",
                        f"make trainer.batch_size a multiple of {chunks}",
                    )
                )
        for other, oslot in parallel.items():
            if other != key and getattr(oslot, "name", None) == "fsdp":
                problems.append(
                    Problem(
                        f"parallel.{other}.type",
                        f'parallel.{other} (type = "fsdp") cannot run under parallel.{key}: FSDP gathers and '
                        "reshards parameters per forward, which the pipeline's chunks would repeat per micro-batch",
                        'use type = "zero1" (DeepSeek-V3\'s choice) or "replicate"',
                    )
                )
        for fkey, fslot in (resolved.get("features") or {}).items():
            splits = kind == "dualpipev" or (kind == "dualpipe" and cfg.zero_bubble)
            if getattr(fslot, "name", None) == "compile" and splits:
                if kind == "dualpipev":
                    what = ("torch's ScheduleDualPipeV splits each backward into input and weight gradients, which "
                            "it refuses for compiled stages")  # fmt: skip
                    fix = 'or use type = "1f1b"'
                else:
                    what = ("its zero-bubble chunks split the backward into input and weight gradients with torch's "
                            "stage_backward_input / _weight, which torch does not support for compiled code")  # fmt: skip
                    fix = f"or set parallel.{key}.zero_bubble = false"
                problems.append(
                    Problem(
                        f"features.{fkey}",
                        f'features.{fkey} (torch.compile) cannot run with parallel.{key} type = "{kind}": {what}',
                        f"turn the feature off (--set features.{fkey}.enabled=false) {fix}",
                    )
                )
            if getattr(fslot, "name", None) == "ema":
                problems.append(
                    Problem(
                        f"features.{fkey}",
                        f"features.{fkey} (EMA) keeps a copy of the whole model, which parallel.{key} cuts into "
                        "stages over ranks; dsk does not cut the EMA copy yet",
                        f"turn the feature off (--set features.{fkey}.enabled=false) for a pipelined run",
                    )
                )
        name = getattr(trainer, "name", None)
        if name is not None and name not in PIPELINED_TRAINERS:
            problems.append(
                Problem(
                    "trainer.type",
                    f'trainer.type = "{name}" cannot run under parallel.{key}: only the next-token trainers '
                    f"({', '.join(PIPELINED_TRAINERS)}) run their step through the pipeline's schedule",
                    f"set parallel.{key}.enabled = false",
                )
            )
    return problems


def pipeline_launch_problems(resolved: dict[str, Any], world_size: int) -> list[Any]:
    """What a pipeline table cannot run on ``world_size`` processes: a world that is not pp x DP, DP ranks with no
    strategy for them, an expert-parallel group that does not divide DP, and (``pp`` left to its default, every
    rank) the shapes of :func:`pipeline_recipe_problems` at that pp."""
    from dsk.api import Problem

    problems = []
    parallel = resolved.get("parallel") or {}
    model = resolved.get("model")
    for key, slot in parallel.items():
        cfg = getattr(slot, "config", None)
        if not isinstance(cfg, PipelineConfig):
            continue
        pp = cfg.pp if cfg.pp is not None else world_size
        where = f"parallel.{key}.pp"
        if world_size % pp:
            problems.append(Problem(where, f"{where} = {pp} does not divide the {world_size} processes: they are "
                                    "pp x the data-parallel ranks", f"run on {pp} processes or a multiple of it"))  # fmt: skip
            continue
        dp = world_size // pp
        others = {k: s for k, s in parallel.items() if k != key}
        if dp > 1 and not others:
            problems.append(Problem(where, f"{world_size} processes at {where} = {pp} leave {dp} data-parallel ranks, "
                                    "and the recipe has no data-parallel table for them",
                                    f'add [parallel.data] type = "zero1", or run on {pp} processes'))  # fmt: skip
        for other, oslot in others.items():
            ep = getattr(getattr(oslot, "config", None), "ep", None)
            if getattr(oslot, "name", None) == "node_limited" and ep is not None and dp % ep:
                problems.append(Problem(f"parallel.{other}.ep", f"parallel.{other}.ep = {ep} must divide the {dp} "
                                        f"data-parallel ranks of each pipeline rank ({world_size} processes / pp {pp})",
                                        "the expert-parallel group lies inside a pipeline stage's data ranks"))  # fmt: skip
        if cfg.pp is None:
            n_layers = getattr(model, "n_layers", None)
            kind = schedule_of(slot)
            if kind is None:
                continue
            for path, message in pipeline_problems(kind, key, pp, cfg.chunks, cfg.layers_per_stage, n_layers):
                problems.append(Problem(path, f"{message} (pp = the {world_size} processes)"))
    return problems


@hookimpl(specname="validate_launch")
def validate_pipeline_launch(resolved, world_size):
    """``--nproc N`` with a pipeline table: the world must be pp x DP and hold the schedule's shapes."""
    return pipeline_launch_problems(resolved, world_size)


@hookimpl(specname="validate_recipe")
def validate_pipeline(resolved):
    """``[parallel.*] type = "1f1b" | "dualpipev" | "dualpipe"``: shapes the schedule can run, and what it runs with."""
    return pipeline_recipe_problems(resolved)
