"""The run context handed to ``trainer.run(ctx)``, and the exceptions a run ends with.

A trainer gets everything it needs from the context: where to write (``run_dir``), the validated recipe sections
of its stage, the registry and plugin manager, the seed and device, where to start from (``init_from``: weights of
the previous stage; ``resume_from``: a checkpoint of this stage to continue exactly), the metrics writer, the
progress reporter, and the interrupt flag set by Ctrl-C. Torch-free: the CLI builds it before importing torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsk.errors import InputError

__all__ = [
    "InterruptFlag",
    "RunContext",
    "RunFailed",
    "RunInterrupted",
    "RunSetupError",
    "launch_rank",
    "launch_world_size",
]


class RunSetupError(InputError):
    """The run cannot start: bad input found at build time (recipe combination, run directory, checkpoint).

    The CLI prints it without a traceback and exits with code 2; nothing has been trained or overwritten.
    """


class RunFailed(RuntimeError):
    """The run stopped on its own (e.g. too many non-finite steps in a row); a good checkpoint was saved.

    Attributes:
        checkpoint: the last checkpoint written, when there is one.
    """

    def __init__(self, message: str, checkpoint: Path | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class RunInterrupted(RuntimeError):
    """The run was interrupted by a signal (Ctrl-C, SIGTERM) and saved a checkpoint first.

    Attributes:
        signum: the signal number.
        checkpoint: the checkpoint written on the way out.
    """

    def __init__(self, message: str, signum: int, checkpoint: Path | None = None):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint


@dataclass
class InterruptFlag:
    """Set by the signal handler, read by the trainer at step boundaries (a step is never cut in half)."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        """Whether an interrupt arrived."""
        return self.signum is not None


def launch_rank() -> int:
    """The rank the launcher gave this process (``RANK``, set by torchrun; 0 without one)."""
    return int(os.environ.get("RANK", "0") or 0)


def launch_world_size() -> int:
    """The process count the launcher started (``WORLD_SIZE``; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class RunContext:
    """What a trainer's ``run(ctx)`` receives.

    Attributes:
        run_dir: directory of this run or stage: ``checkpoints/``, ``metrics.jsonl`` and ``summary.json`` go here.
        root_dir: the run directory (equal to ``run_dir`` unless the recipe has ``[[stages]]``).
        sections: validated recipe sections of this stage (``model``, ``data``, ``tokenizer``, ``trainer``,
            ``checkpoint``, ``logging``... as config objects and resolved slots).
        registry: the component registry.
        pm: the plugin manager (``pm.hook.on_step_end`` after each optimizer step).
        seed: ``[dsk] seed``.
        stage: the stage name (None for a single-stage recipe); ``stage_index`` its position.
        init_from: a checkpoint directory whose weights initialise the model (the previous stage's last one).
        resume_from: a checkpoint directory of this stage to continue from exactly (``--resume``).
        metrics: the ``metrics.jsonl`` writer.
        reporter: progress display (``start``, ``update``, ``message``, ``stop``).
        interrupt: set when Ctrl-C / SIGTERM arrives; the trainer saves and raises :class:`RunInterrupted`.
        parallel: the stage's parallel strategy (:class:`dsk.api.ParallelStrategy`), set by the build path; before
            that, rank and world size come from the launcher's environment (``RANK``, ``WORLD_SIZE``).
        features: the stage's built features (:class:`dsk.api.Feature`, in application order), set by the build path
            before the strategy wraps the model (a sharding strategy reads a precision policy from them).
        save_delay: test hook, seconds slept inside each checkpoint save before its rename (0 in real runs), for
            saves of step ``save_delay_from_step`` or later.
    """

    run_dir: Path
    sections: dict[str, Any]
    registry: Any
    pm: Any
    metrics: Any
    reporter: Any
    root_dir: Path | None = None
    seed: int = 0
    stage: str | None = None
    stage_index: int = 0
    init_from: Path | None = None
    resume_from: Path | None = None
    interrupt: InterruptFlag = field(default_factory=InterruptFlag)
    parallel: Any = None
    features: Any = None
    save_delay: float = 0.0
    save_delay_from_step: int = 0

    def __post_init__(self) -> None:
        if self.root_dir is None:
            self.root_dir = self.run_dir

    # -- ranks: every write goes through is_writer, every cross-rank sum through all_reduce ---------------------
    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.parallel.rank if self.parallel is not None else launch_rank()

    @property
    def world_size(self) -> int:
        """The number of processes."""
        return self.parallel.world_size if self.parallel is not None else launch_world_size()

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes metrics, checkpoints and summaries and shows progress (one rank does)."""
        return self.parallel.is_writer if self.parallel is not None else launch_rank() == 0

    def all_reduce(self, tensor: Any, op: str = "sum") -> Any:
        """Reduce ``tensor`` over the data-parallel ranks (identity in one process)."""
        return self.parallel.all_reduce(tensor, op) if self.parallel is not None else tensor

    # -- sections ----------------------------------------------------------------------------------------------
    def section(self, key: str) -> Any:
        """A validated recipe section (None when the recipe has none)."""
        return self.sections.get(key)

    @property
    def device(self) -> str:
        """The torch device: the trainer's ``device`` option resolved (``auto``: cuda when available, else cpu)."""
        trainer = self.section("trainer")
        wanted = getattr(getattr(trainer, "config", None), "device", "auto")
        if wanted != "auto":
            return wanted
        placed = getattr(self.parallel, "device", None) if self.parallel is not None else None
        if placed:
            return placed  # a rank's own device (cuda:<local rank>)
        import torch

        if torch.cuda.is_available():
            local = os.environ.get("LOCAL_RANK")
            return f"cuda:{local}" if local and launch_world_size() > 1 else "cuda"
        return "cpu"

    # -- builders ----------------------------------------------------------------------------------------------
    def build_tokenizer(self) -> Any:
        """The tokenizer of ``[tokenizer]`` (default ``char``)."""
        slot = self.section("tokenizer")
        if slot is None:
            from dsk.data.tokenizers import load_tokenizer

            return load_tokenizer("char")
        return slot.build()

    def build_task(self) -> Any:
        """The task (data source) of ``[data]``.

        Raises:
            RunSetupError: the recipe has no ``[data]`` section.
        """
        slot = self.section("data")
        if slot is None:
            raise RunSetupError('the trainer needs a [data] section (a task such as type = "arithmetic")')
        return slot.build()

    def build_model(self, vocab_size: int | None) -> Any:
        """The model of ``[model]`` on :attr:`device` (weights drawn from the torch RNG: seed it first)."""
        from dsk.model import build_model

        model_cfg = self.section("model")
        if model_cfg is None:
            raise RunSetupError("the trainer needs a [model] section")
        try:
            model = build_model(model_cfg, vocab_size)
        except ValueError as exc:  # e.g. model.vocab_size smaller than the tokenizer's
            raise RunSetupError(str(exc)) from None
        return model.to(self.device)

    def table(self, key: str) -> dict[str, Any] | None:
        """A section as a plain TOML table (``{"type": ..., **options}`` for a slot), for ``state.json``."""
        from dsk.recipe.dump import resolved_to_table

        value = self.section(key)
        return None if value is None else resolved_to_table({key: value}).get(key)
