"""The step loop shared by every trainer (``dsk_trainers.lm``, ``dsk_rl.grpo``, ``dsk_rl.distill``).

:class:`TrainerRun` holds one run's counters and drives it: set-up (resume included), then per step the trainer's
``train_step``, the ``metrics.jsonl`` row on the logging cadence, the ``on_step_end`` hook, the progress bar, the
stop after ``max_nonfinite`` non-finite steps in a row, evaluation and checkpoints on their cadence; at the end the
final evaluation, the final checkpoint and the stage summary (read from ``metrics.jsonl``, so a resumed run reports
what an uninterrupted one would).
"""

from __future__ import annotations

import abc
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from dsk.train.build import BuiltRun
from dsk.train.checkpoint import load_checkpoint, load_model_weights, save_checkpoint, set_rng_state
from dsk.train.context import RunContext, RunFailed, RunInterrupted, RunSetupError
from dsk.train.metrics import read_metrics
from dsk.train.optim import load_optimizer_state

# Steps between the training loop's own young-generation garbage collections (automatic ones are off in the loop).
GC_EVERY = 50

__all__ = ["TrainerRun", "tokens_per_s"]


class TrainerRun(abc.ABC):
    """State and loop of one trainer run (one stage); ``run()`` returns the stage summary.

    A subclass implements ``setup`` (which builds its run with :func:`dsk.api.runtime.build_run`, takes it with
    :meth:`use`, and calls :meth:`_resume` when ``ctx.resume_from`` is set), ``train_step`` (returns the step's
    metrics row with ``skipped``; its update is :meth:`BuiltRun.update`), ``evaluate``, ``save`` (through
    :meth:`write_checkpoint`), ``nonfinite_message`` and ``summary_metrics``; ``restore``, ``before_loop``,
    ``log_row`` and ``total_steps`` are optional hooks, ``summary_columns`` its own summary numbers.
    ``trainer.config`` has ``steps`` and ``max_nonfinite`` (and ``eval_every`` where it evaluates).
    """

    #: ``(key, label, format)`` of the summary numbers this trainer reports beyond loss, throughput and accuracy;
    #: the progress bar, the runner's summary and the summary table show them
    summary_columns: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, trainer: Any, ctx: RunContext):
        self.built: BuiltRun | None = None
        self.trainer = trainer
        self.cfg = trainer.config
        self.ctx = ctx
        self.device = torch.device(ctx.device)
        self.step = 0
        self.in_a_row = 0
        self.skipped = 0
        self.tokens_seen = 0
        self.last_checkpoint: Path | None = None
        self.last_saved_step = -1
        self.started = time.perf_counter()
        self.start_eval: dict[str, Any] = {}  # the evaluation before the first step, where a trainer runs one

    # -- hooks -------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self) -> None:
        """Implemented by each trainer."""

    @abc.abstractmethod
    def train_step(self) -> dict[str, Any]:
        """Implemented by each trainer."""

    @abc.abstractmethod
    def evaluate(self, examples: int = 0) -> dict[str, Any]:
        """Implemented by each trainer."""

    @abc.abstractmethod
    def save(self, reason: str) -> Path:
        """Implemented by each trainer."""

    @abc.abstractmethod
    def nonfinite_message(self, path: Path) -> str:
        """The message of the :class:`RunFailed` raised after ``max_nonfinite`` non-finite steps in a row."""

    @abc.abstractmethod
    def summary_metrics(self, train: list[dict[str, Any]], timed: list[dict[str, Any]]) -> dict[str, Any]:
        """The trainer's summary keys from its train rows (``timed``: those after step 1 with a ``step_s``)."""

    def restore(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook, empty by default
        """Restore the trainer's own part of a checkpoint's state on resume."""

    def before_loop(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Runs once after the progress bar starts, before the first step."""

    def log_row(self, row: dict[str, Any]) -> None:
        """Log a train row (on the logging cadence, and every skipped or last step)."""
        self.ctx.metrics.write(row)

    # -- resume, interrupt -------------------------------------------------------------------------------------
    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        state = ckpt.state
        if state.get("trainer") != self.trainer.name:
            raise RunSetupError(f"{ckpt.path}: written by trainer {state.get('trainer')!r}, not {self.trainer.name!r}")
        if ckpt.optimizer_meta is None:
            raise RunSetupError(f"{ckpt.path}: has no optimizer state, so the run cannot continue exactly")
        # through the strategy first: a sharded model takes its share of the full state
        parallel = self.built.parallel if self.built is not None else None
        base = self.built.base_model if self.built is not None else self.model
        where = str(ckpt.path)
        if parallel is None or not parallel.load_model_state_dict(base, ckpt.model_state, where):
            load_model_weights(self.model, ckpt.model_state, where)
        tensors, meta = ckpt.optimizer_tensors, ckpt.optimizer_meta
        if parallel is None or not parallel.load_optimizer_state_dict(self.optimizer, base, tensors, meta, where):
            load_optimizer_state(self.optimizer, tensors, meta, where)
        if self.built is not None:
            self.built.load_feature_state(ckpt.feature_state, str(ckpt.path))
        self.restore(state)
        set_rng_state(state["rng"])
        self.step = ckpt.step
        self.in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.skipped = int(state.get("nonfinite_skipped", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.last_checkpoint, self.last_saved_step = ckpt.path, ckpt.step
        dropped = self.ctx.metrics.truncate_after(self.step)
        note = f" ({dropped} metrics rows after it dropped)" if dropped else ""
        self.ctx.reporter.message(f"resuming from {ckpt.path} at step {self.step}{note}")

    def use(self, built: BuiltRun) -> BuiltRun:
        """Take the model and optimizer of a built run (:func:`dsk.api.runtime.build_run`)."""
        self.built = built
        self.model = built.model
        self.optimizer = built.optimizer
        self.params = built.params
        return built

    def write_checkpoint(self, reason: str, state: dict[str, Any], *, tokenizer: Any, task_table: Any = None) -> Path:
        """``checkpoints/step-N/`` of this stage: weights, optimizer, features' state and ``state`` (written by the
        writing rank only; every rank waits for it). Readable by ``dsk generate`` and by the next stage."""
        ctx = self.ctx
        tokenizer_json = json.loads(tokenizer.to_json())
        task_table = ctx.table("data") if task_table is None else task_table
        full = {
            "trainer": self.trainer.name,
            "stage": ctx.stage,
            "reason": reason,
            "seed": ctx.seed,
            "task": task_table,
            "tokenizer": tokenizer_json,
            "model": ctx.table("model"),
            "nonfinite_in_a_row": self.in_a_row,
            "nonfinite_skipped": self.skipped,
            "tokens_seen": self.tokens_seen,
            **state,
        }
        built = self.built
        model = built.base_model if built is not None else self.model
        model_state = optimizer_state = None
        if built is not None:  # collective: a sharding strategy gathers the full state for the writing rank
            model_state = built.parallel.model_state_dict(model)
            if self.optimizer is not None:
                optimizer_state = built.parallel.optimizer_state_dict(self.optimizer, model)
        path = save_checkpoint(
            ctx.run_dir,
            self.step,
            model=model,
            optimizer=self.optimizer,
            state=full,
            config_extra={"tokenizer": tokenizer_json, "task": task_table, "step": self.step},
            keep=getattr(ctx.section("checkpoint"), "keep", None),
            save_delay=ctx.save_delay if self.step >= ctx.save_delay_from_step else 0.0,
            feature_state=built.feature_state() if built is not None else None,
            write=ctx.is_writer,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
        if built is not None:
            built.parallel.barrier()
        self.last_checkpoint, self.last_saved_step = path, self.step
        return path

    def _interrupt_agreed(self) -> bool:
        """Whether any rank was interrupted, agreed by all ranks at this step boundary (so all save together).

        On several ranks this is a one-value all-reduce per step. A peer that died makes it raise instead: a
        SIGTERM sent after a rank failed never starts a collective save with a dead peer.
        """
        flag = self.ctx.interrupt
        built = self.built
        if built is None or built.parallel.world_size == 1:
            return flag.requested
        if built.parallel.any_rank(flag.requested) and flag.signum is None:
            flag.signum = 15  # SIGTERM: another rank's signal
        return flag.requested

    def _check_interrupt(self) -> None:
        flag = self.ctx.interrupt
        if self._interrupt_agreed():
            path = self.save("interrupt") if self.last_saved_step != self.step else self.last_checkpoint
            raise RunInterrupted(f"interrupted at step {self.step}; checkpoint saved to {path}", flag.signum, path)

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train for ``cfg.steps`` steps (continuing ``ctx.resume_from`` if set); returns the summary."""
        ctx, cfg = self.ctx, self.cfg
        self.setup()
        log_every = getattr(ctx.section("logging"), "every", 1)
        save_every = getattr(ctx.section("checkpoint"), "every", 0)
        label = self.trainer.name + (f" [{ctx.stage}]" if ctx.stage else "")
        ctx.reporter.start(self.total_steps(), label, completed=self.step, columns=self.summary_columns)
        self.before_loop()
        final_eval: dict[str, Any] = {}
        # The cyclic garbage collector, as torchtitan manages it: everything built so far (model, optimizer, data,
        # plugins) lives for the whole run, so it leaves the collector's generations, and automatic collections,
        # which a step's thousands of short-lived tensors trigger over and over, give way to one young-generation
        # pass every GC_EVERY steps (measured ~5 % of a small CPU step). Reference counting frees everything that
        # is not a cycle as before.
        gc.collect()
        gc.freeze()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            while self.step < self.total_steps():
                self._check_interrupt()
                row = self.train_step()
                step = self.step
                if step % GC_EVERY == 0:
                    gc.collect(1)
                if step % log_every == 0 or row["skipped"] or step == self.total_steps():
                    self.log_row(row)
                ctx.pm.hook.on_step_end(ctx=ctx, step=step, metrics=row)
                ctx.reporter.update(step, row)
                if self.in_a_row >= cfg.max_nonfinite:
                    path = self.save("nonfinite")
                    raise RunFailed(self.nonfinite_message(path), path)
                eval_every = getattr(cfg, "eval_every", 0)
                if eval_every and step % eval_every == 0 and step < self.total_steps():
                    self.evaluate()
                if save_every and step % save_every == 0 and step < self.total_steps():
                    self.save("interval")
            self._check_interrupt()
            final_eval = self.evaluate(examples=3)
            if self.last_saved_step != self.step:
                self.save("final")
        finally:
            gc.unfreeze()
            if gc_was_enabled:
                gc.enable()
            ctx.reporter.stop()
        return self.summary(final_eval)

    def total_steps(self) -> int:
        """Optimizer steps of this run (``trainer.steps`` unless the trainer computes them)."""
        return self.cfg.steps

    def summary(self, final_eval: dict[str, Any]) -> dict[str, Any]:
        """Stage summary from ``metrics.jsonl`` (so a resumed run reports what an uninterrupted one would)."""
        rows = read_metrics(self.ctx.metrics.path)
        train = [r for r in rows if r.get("kind") == "train"]
        timed = [r for r in train if r.get("step", 0) > 1 and r.get("step_s")]  # step 1 pays one-off set-up costs
        out: dict[str, Any] = {
            "stage": self.ctx.stage,
            "trainer": self.trainer.name,
            "status": "completed",
            "steps": self.total_steps(),
            "step": self.step,
            **self.summary_metrics(train, timed),
            "tokens_total": self.tokens_seen,
            "nonfinite_skipped": self.skipped,
            "parameters": sum(p.numel() for p in self.params),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "wall_s": time.perf_counter() - self.started,
            "columns": [list(c) for c in self.summary_columns],
        }
        for key, value in self.start_eval.items():
            if key.startswith("eval/") and key not in ("eval/samples", "eval/seconds"):
                out[f"{key}_start"] = value
        for key, value in final_eval.items():
            if key.startswith("eval/") or key == "examples":
                out[key] = value
        return out


def tokens_per_s(timed: list[dict[str, Any]]) -> float | None:
    """Training throughput over the timed train rows."""
    return sum(r["tokens"] for r in timed) / sum(r["step_s"] for r in timed) if timed else None
