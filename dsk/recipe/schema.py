"""Config models of the recipe sections that the core owns (torch-free)."""

from __future__ import annotations

from pydantic import Field

from dsk.api import BaseConfig


class DskMeta(BaseConfig):
    """The ``[dsk]`` table: recipe metadata (``extends`` is consumed by the loader)."""

    description: str = Field("", description="one line saying what the recipe is for")
    seed: int = Field(0, description="global seed: the same recipe and seed give the same losses on CPU")
    schema_version: int = Field(1, alias="schema", ge=1, le=1, description="recipe format version")


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
    "checkpoint": "checkpoint cadence and retention",
    "logging": "metrics and progress display",
    "plugins": "plugin-global settings: [plugins.<name>]",
    "stages": "[[stages]]: a multi-stage pipeline, each stage overlaying sections",
}

#: sections a stage may overlay
STAGE_SECTIONS = ("data", "tokenizer", "features", "parallel", "trainer", "checkpoint", "logging", "model")
