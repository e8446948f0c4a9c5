"""Config models of the recipe sections that the core owns (torch-free)."""

from __future__ import annotations

from pydantic import Field, field_validator

from dsk.api import BaseConfig

#: the recipe format this dsk reads
SCHEMA_VERSION = 2


class DskMeta(BaseConfig):
    """The ``[dsk]`` table: recipe metadata (``extends`` is consumed by the loader)."""

    description: str = Field("", description="one line saying what the recipe is for")
    seed: int = Field(0, description="global seed: the same recipe and seed give the same losses on CPU")
    schema_version: int = Field(
        SCHEMA_VERSION,
        alias="schema",
        description="recipe format version (2: the optimizer and its schedule moved from [trainer] to [optimizer])",
    )

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value == 1:
            raise ValueError(
                "schema 1 recipes are no longer read: schema 2 moved the optimizer options (lr, min_lr, warmup_steps, "
                "schedule, betas, eps, weight_decay, grad_clip) from [trainer] to an [optimizer] section; move them "
                "and write schema = 2"
            )
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema {value} is not known to this dsk (it reads schema {SCHEMA_VERSION})")
        return value


class CheckpointConfig(BaseConfig):
    """The ``[checkpoint]`` table."""

    every: int = Field(0, ge=0, description="save every N optimizer steps (0: only at the end of a run or stage)")
    keep: int = Field(2, ge=1, description="how many step checkpoints to keep (the newest ones)")


class LoggingConfig(BaseConfig):
    """The ``[logging]`` table."""

    every: int = Field(1, ge=1, description="write a metrics row every N optimizer steps")
    progress: bool = Field(True, description="show a rich progress bar")


#: top-level sections a recipe may have, with a one-line meaning (for errors and docs)
SECTIONS: dict[str, str] = {
    "dsk": "recipe metadata: extends, description, seed",
    "model": "the model skeleton and its component slots",
    "data": "data source: a task plugin or JSONL files (slot of kind task)",
    "tokenizer": "tokenizer (slot of kind tokenizer)",
    "features": "keyed feature slots: [features.<name>]",
    "parallel": "keyed parallel-strategy slots: [parallel.<name>]",
    "trainer": "the trainer (slot of kind trainer)",
    "optimizer": "the optimizer and its learning-rate schedule (slot of kind optimizer, default adamw)",
    "checkpoint": "checkpoint cadence and retention",
    "logging": "metrics and progress display",
    "plugins": "plugin-global settings: [plugins.<name>]",
    "stages": "[[stages]]: a multi-stage pipeline, each stage overlaying sections",
}

#: sections a stage may overlay
STAGE_SECTIONS = (
    "data",
    "tokenizer",
    "features",
    "parallel",
    "trainer",
    "optimizer",
    "checkpoint",
    "logging",
    "model",
)

#: the optimizer used when a recipe has no [optimizer] table
DEFAULT_OPTIMIZER = "adamw"
