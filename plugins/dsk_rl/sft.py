"""Fine-tuning on a written trace dataset with the runtime's ``sft`` trainer, as a sub-run of the current stage.

Rejection sampling and sequence-level distillation end with plain SFT (R1 stage 3; R1-Distill). Rather than a
second SFT loop, the stage builds the registered ``sft`` trainer on a ``jsonl`` data slot pointing at the traces and
runs it in the stage's own directory: its checkpoints are the stage's checkpoints (the next stage starts from them),
its rows go to the stage's ``metrics.jsonl``, and ``--resume`` continues it exactly.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from dsk.api.runtime import RunContext, RunSetupError, latest_checkpoint

__all__ = ["resolve_checkpoint", "run_sft", "sft_steps"]


def resolve_checkpoint(ctx: RunContext, spec: str) -> Path:
    """A checkpoint directory from ``spec``: ``stage:<name>`` (the last checkpoint of that stage of this run), or
    a path (a run or stage directory: its latest checkpoint; or a ``step-N`` directory).

    Raises:
        RunSetupError: nothing loadable there.
    """
    if spec.startswith("stage:"):
        name = spec.partition(":")[2]
        path = Path(ctx.root_dir) / "stages" / name
        found = latest_checkpoint(path)
        if found is None:
            raise RunSetupError(f"'{spec}': stage '{name}' has no checkpoint in {path}; run that stage first")
        return found
    path = Path(spec)
    if (path / "state.json").is_file() or (path / "config.json").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise RunSetupError(f"'{spec}': no checkpoint there (no config.json, no checkpoints/step-N/)")
    return found


def sft_steps(cfg: Any, n_rows: int, data_ranks: int = 1) -> int:
    """``cfg.steps``, capped at ``cfg.epochs_max`` passes over ``n_rows`` rows when that is set (a step reads
    ``batch_size`` rows on each of the ``data_ranks`` data-parallel ranks)."""
    if cfg.epochs_max > 0 and n_rows > 0:
        return max(1, min(cfg.steps, math.ceil(cfg.epochs_max * n_rows / (cfg.batch_size * data_ranks))))
    return cfg.steps


def run_sft(
    ctx: RunContext,
    data_path: Path,
    cfg: Any,
    *,
    steps: int,
    init_from: Path | None,
    resume_from: Path | None,
) -> dict[str, Any]:
    """Run the registered ``sft`` trainer on ``data_path`` inside this stage (see the module doc).

    Args:
        ctx: the stage's run context.
        data_path: JSONL of ``{"prompt", "completion", ...}`` rows.
        cfg: a :class:`dsk_rl.config.SFTPhaseConfig` (optimiser, batch, sequence length).
        steps: optimizer steps.
        init_from: the weights the SFT starts from (None: the model's seeded initialisation).
        resume_from: a checkpoint of this SFT to continue exactly.
    """
    table = {
        "type": "sft",
        "steps": steps,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "device": cfg.device,
        "max_nonfinite": cfg.max_nonfinite,
        "eval_samples": 0,  # the stage evaluates on its own task, not on the trace file
    }
    try:
        trainer_slot = ctx.registry.resolve_slot("trainer", table)
        data_slot = ctx.registry.resolve_slot("task", {"type": "jsonl", "path": str(data_path), "kind": "sft"})
    except Exception as exc:  # the sft trainer or the jsonl task is not installed, or rejects an option
        raise RunSetupError(f"cannot set up the SFT phase: {exc}") from None
    # the stage's [optimizer], its warm-up capped at the SFT's steps (a short fine-tuning still reaches its rate)
    optimizer = ctx.section("optimizer")
    if optimizer is not None and optimizer.config.warmup_steps > steps:
        optimizer = dataclasses.replace(optimizer, config=optimizer.config.model_copy(update={"warmup_steps": steps}))
    sections = {**ctx.sections, "trainer": trainer_slot, "data": data_slot, "optimizer": optimizer}
    sub = dataclasses.replace(ctx, sections=sections, init_from=init_from, resume_from=resume_from)
    return trainer_slot.build().run(sub)
