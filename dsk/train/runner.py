"""The runner behind ``dsk train``: run directory, ``[[stages]]`` chaining, ``--resume``, Ctrl-C.

Layout of a run directory::

    <run>/resolved.toml          the validated recipe, every default written out (stages included)
    <run>/summary.json           status and final numbers of every stage
    <run>/metrics.jsonl          one row per optimizer step (+ eval rows)           } single-stage recipe
    <run>/checkpoints/step-N/    see dsk.train.checkpoint                           }
    <run>/stages/<name>/...      metrics.jsonl, checkpoints/, summary.json per stage of a [[stages]] recipe

Stages run in order; each starts from the weights of the previous stage's last checkpoint (a fresh optimizer and
step count: a stage is a new training phase, as SFT after pre-training). ``--resume`` skips completed stages and
continues the first unfinished one from its latest checkpoint. ``--stage NAME`` runs one stage only.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsk.train.context import InterruptFlag, RunContext, RunFailed, RunInterrupted, RunSetupError, launch_rank

__all__ = ["StagePlan", "default_run_dir", "plan_stages", "resolved_toml", "run_recipe", "SAVE_DELAY_ENV"]

#: test hook read at the CLI edge: seconds to sleep inside each checkpoint save, before its rename
SAVE_DELAY_ENV = "DSK_DEBUG_SAVE_DELAY"
SUMMARY = "summary.json"
RESOLVED = "resolved.toml"
METRICS = "metrics.jsonl"


@dataclass
class StagePlan:
    """One stage to run: its name (None for a single-stage recipe), position, validated sections and directory."""

    name: str | None
    index: int
    sections: dict[str, Any]
    dir: Path


def default_run_dir(recipe_path: str | None, now: float | None = None) -> Path:
    """``runs/<recipe stem>-<YYYYmmdd-HHMMSS>``."""
    stem = Path(recipe_path).stem if recipe_path else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


def plan_stages(validated: Any, run_dir: Path) -> list[StagePlan]:
    """The stages of a validated recipe (one unnamed stage when it has no ``[[stages]]``)."""
    if validated.stages:
        return [
            StagePlan(name, i, sections, run_dir / "stages" / name)
            for i, (name, sections) in enumerate(validated.stages)
        ]
    return [StagePlan(None, 0, validated.resolved, run_dir)]


def resolved_toml(validated: Any) -> str:
    """``resolved.toml``: the base sections, then each stage fully resolved (so a stage reads on its own)."""
    from dsk.recipe.dump import resolved_to_table, to_toml

    table = resolved_to_table(validated.resolved)
    if validated.stages:
        table["stages"] = [{"name": name, **resolved_to_table(sections)} for name, sections in validated.stages]
    return to_toml(table)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _stage_status(plan: StagePlan) -> str | None:
    data = _read_json(plan.dir / SUMMARY)
    if data is None:
        return None
    if plan.name is None:
        stages = data.get("stages") or [{}]
        return stages[0].get("status")
    return data.get("status")


def _same_recipe(old_text: str, new_text: str) -> bool:
    """Whether two resolved recipes hold the same values (compared as data: key order is not a difference)."""
    from dsk.recipe.load import tomllib  # tomllib, or tomli on Python 3.10

    try:
        return tomllib.loads(old_text) == tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        return False


def _holds_a_run(directory: Path) -> bool:
    return (directory / METRICS).exists() or (directory / "checkpoints").exists()


@contextmanager
def _signal_handlers(flag: InterruptFlag) -> Iterator[None]:
    """SIGINT/SIGTERM set ``flag``; the trainer saves at the end of the step. A second Ctrl-C aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.signum is not None:
            raise KeyboardInterrupt
        flag.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def prepare_run_dir(
    validated: Any, run_dir: Path, *, resume: bool, stage: str | None, write: bool = True
) -> list[StagePlan]:
    """Check the run directory against the options and write ``resolved.toml`` (``write``: the writing rank only);
    returns every stage's plan.

    Raises:
        RunSetupError: ``--resume`` without a run, a run directory that holds another run or another recipe,
            an unknown ``--stage``.
    """
    plans = plan_stages(validated, run_dir)
    names = [p.name for p in plans if p.name is not None]
    if stage is not None and stage not in names:
        if not names:
            raise RunSetupError(f"--stage {stage}: the recipe has no [[stages]]")
        raise RunSetupError(f"--stage {stage}: no such stage; the recipe's stages are {', '.join(names)}")
    text = resolved_toml(validated)
    resolved_path = run_dir / RESOLVED
    if resume and not resolved_path.exists():
        raise RunSetupError(f"--resume: {run_dir} holds no run to resume (no {RESOLVED})")
    if resolved_path.exists():
        if not _same_recipe(resolved_path.read_text(encoding="utf-8"), text):
            raise RunSetupError(
                f"{resolved_path} was written by a different recipe (or other --set values); resuming would not "
                "continue the same run. Use the same recipe and options, or another --run-dir."
            )
    if not resume:
        todo = [p for p in plans if stage is None or p.name == stage]
        busy = [p.dir for p in todo if _holds_a_run(p.dir)]
        if busy:
            raise RunSetupError(
                f"{busy[0]} already holds a run; pass --resume to continue it, or choose another --run-dir "
                "(nothing was changed)"
            )
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resolved_path.exists():
            resolved_path.write_text(text, encoding="utf-8")
    return plans


def run_recipe(
    validated: Any,
    *,
    registry: Any,
    pm: Any,
    run_dir: Path,
    recipe_path: str | None = None,
    resume: bool = False,
    stage: str | None = None,
    reporter: Any,
    save_delay: float = 0.0,
    save_delay_from_step: int = 0,
) -> dict[str, Any]:
    """Run a validated recipe's stages into ``run_dir``; returns the summary (also written to summary.json).

    Raises:
        RunSetupError: bad run directory / options / recipe combination (nothing trained).
        RunFailed: a stage stopped itself (summary.json says so; a good checkpoint exists).
        RunInterrupted: Ctrl-C or SIGTERM (a checkpoint was saved).
    """
    from dsk.train import distributed
    from dsk.train.process import tune_process

    tune_process()  # e.g. steady page reuse step after step (see dsk.train.process)
    created = distributed.init_process_group()  # N ranks under a launcher: the default group, once
    try:
        return _run_stages(
            validated, registry=registry, pm=pm, run_dir=run_dir, recipe_path=recipe_path, resume=resume,
            stage=stage, reporter=reporter, save_delay=save_delay, save_delay_from_step=save_delay_from_step,
        )  # fmt: skip
    finally:
        if created:
            distributed.shutdown()


def _agree(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the identity in one process): decisions read from the run directory are
    taken once, by the writing rank, so no rank sees the directory half-way through another's write."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_stages(
    validated: Any,
    *,
    registry: Any,
    pm: Any,
    run_dir: Path,
    recipe_path: str | None,
    resume: bool,
    stage: str | None,
    reporter: Any,
    save_delay: float,
    save_delay_from_step: int,
) -> dict[str, Any]:
    from dsk.train.checkpoint import latest_checkpoint
    from dsk.train.metrics import MetricsWriter

    # One rank writes the run directory; the parallel strategy of each stage keeps the same writing rank.
    writer = launch_rank() == 0
    problem = None
    if writer:
        if resume and not (run_dir / RESOLVED).exists():
            # The same command starts a run and restarts it (a preempted job re-queued as is).
            reporter.message(f"--resume: {run_dir} holds no run yet; starting a new one")
            resume = False
        try:
            prepare_run_dir(validated, run_dir, resume=resume, stage=stage, write=True)
        except RunSetupError as exc:
            problem = str(exc)
    problem, resume = _agree((problem, resume))
    if problem is not None:
        raise RunSetupError(problem)
    plans = plan_stages(validated, run_dir)
    meta = validated.resolved.get("dsk")
    seed = int(getattr(meta, "seed", 0))
    summary_path = run_dir / SUMMARY
    previous = _read_json(summary_path) or {}
    stage_summaries: dict[int, dict[str, Any]] = {
        i: s for i, s in enumerate(previous.get("stages", [])) if isinstance(s, dict)
    }
    summary: dict[str, Any] = {"status": "running", "recipe": recipe_path, "run_dir": str(run_dir)}
    if isinstance(previous.get("examples"), dict):
        summary["examples"] = previous["examples"]  # completed stages that are skipped keep their examples
    flag = InterruptFlag()

    def write_summary(status: str) -> None:
        summary["status"] = status
        summary["stages"] = [stage_summaries.get(p.index, {"stage": p.name, "status": "pending"}) for p in plans]
        done = [s for s in summary["stages"] if s.get("status") == "completed"]
        last = done[-1] if done else {}
        own = [col[0] for col in last.get("columns") or []]  # the trainer's declared summary columns
        for key in ("final_loss", "eval/accuracy", "eval/loss", "eval/ppl", *own, "tokens_per_s", "checkpoint"):
            if key in last:
                summary[key] = last[key]
        if writer:
            _write_json(summary_path, summary)

    with _signal_handlers(flag):
        for plan in plans:
            if stage is not None and plan.name != stage:
                continue
            if _agree(resume and _stage_status(plan) == "completed"):
                reporter.message(f"stage {plan.name or 'train'}: already completed, skipped")
                continue
            init_from = None
            if plan.index > 0:
                prev = plans[plan.index - 1]
                init_from, prev_done = _agree((latest_checkpoint(prev.dir), _stage_status(prev) == "completed"))
                if init_from is None or not prev_done:
                    raise RunSetupError(
                        f"stage '{plan.name}' starts from the last checkpoint of stage '{prev.name}', which has not "
                        f"completed in {run_dir}; run it first (or drop --stage)"
                    )
            resume_from = _agree(latest_checkpoint(plan.dir) if resume else None)
            trainer_slot = plan.sections.get("trainer")
            if trainer_slot is None:
                raise RunSetupError(f"stage '{plan.name}' has no [trainer]")
            if writer:
                plan.dir.mkdir(parents=True, exist_ok=True)
            metrics = MetricsWriter(plan.dir / METRICS, enabled=writer)
            if resume and resume_from is None:
                metrics.truncate_after(0)  # killed before its first checkpoint: the stage starts over
            ctx = RunContext(
                run_dir=plan.dir,
                root_dir=run_dir,
                sections=plan.sections,
                registry=registry,
                pm=pm,
                metrics=metrics,
                reporter=reporter,
                seed=seed,
                stage=plan.name,
                stage_index=plan.index,
                init_from=init_from,
                resume_from=resume_from,
                interrupt=flag,
                save_delay=save_delay,
                save_delay_from_step=save_delay_from_step,
            )
            trainer = trainer_slot.build()
            try:
                try:
                    result = trainer.run(ctx)
                finally:
                    if ctx.parallel is not None:
                        ctx.parallel.teardown()
            except (RunInterrupted, RunFailed) as exc:
                status = "interrupted" if isinstance(exc, RunInterrupted) else "failed"
                stage_summaries[plan.index] = {
                    "stage": plan.name,
                    "trainer": trainer_slot.name,
                    "status": status,
                    "error": str(exc),
                    "checkpoint": str(exc.checkpoint) if exc.checkpoint else None,
                }
                write_summary(status)
                raise
            examples = result.pop("examples", None)
            stage_summaries[plan.index] = result
            if plan.name is not None and writer:
                _write_json(plan.dir / SUMMARY, result)
            write_summary("running")
            if examples:
                summary.setdefault("examples", {})[plan.name or "train"] = examples
    pending = [p for p in plans if stage_summaries.get(p.index, {}).get("status") != "completed"]
    write_summary("completed" if not pending else "partial")
    return summary
