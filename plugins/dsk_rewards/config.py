"""Configs of the built-in rewards (torch-free; validated when a recipe loads).

Every reward config derives from :class:`RewardConfig`, so every ``[trainer.rewards.<name>]`` table takes a
``weight``: the trainer sums ``weight * reward`` over the rewards (DeepSeek-R1: accuracy + format with equal weights,
plus language consistency in the reasoning RL stage).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsk.api import BaseConfig

__all__ = [
    "AccuracyConfig",
    "FormatConfig",
    "LanguageConsistencyConfig",
    "OverlongConfig",
    "RewardConfig",
    "StepsConfig",
]


class RewardConfig(BaseConfig):
    """Options every reward shares."""

    weight: float = Field(1.0, description="weight of this reward in the weighted sum the trainer optimises")


class AccuracyConfig(RewardConfig):
    """Rule-based accuracy: the task's own checker on the completion (R1's accuracy reward)."""

    wrong: float = Field(
        0.0, description="reward of a checked but wrong answer (TinyZero uses 0.1 for a well-formed one)"
    )
    correct: float = Field(1.0, description="reward of a correct answer")


class FormatConfig(RewardConfig):
    """R1's format reward: ``<think>…</think><answer>…</answer>`` and nothing else."""

    require_think: bool = Field(
        True, description="the completion must reason in one <think>…</think> block before its answer"
    )
    allow_empty: bool = Field(
        False,
        description="accept an empty think or answer block (off: an empty <think></think> is a known reward hack)",
    )
    partial: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="reward of a completion that has every tag exactly once but not in the required layout",
    )


class LanguageConsistencyConfig(RewardConfig):
    """DeepSeek-R1's language-consistency reward: the share of chain-of-thought words in the target language."""

    column: str = Field("language", description="record column naming the target language of each prompt")
    scope: Literal["think", "completion"] = Field(
        "think", description="score the <think> block only (R1: the CoT) or the whole completion"
    )


class OverlongConfig(RewardConfig):
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_length - buffer, then linearly down to -1."""

    max_length: int | None = Field(
        None,
        ge=1,
        description="L_max in tokens; unset: the trainer's max_completion_length (a truncated completion gets -1)",
    )
    buffer: int = Field(8, ge=1, description="C: the punishment grows linearly over the last C tokens before L_max")

    @model_validator(mode="after")
    def _buffer_fits(self) -> OverlongConfig:
        if self.max_length is not None and self.buffer > self.max_length:
            raise ValueError(f"buffer = {self.buffer} is larger than max_length = {self.max_length}")
        return self


class StepsConfig(RewardConfig):
    """A rule-based process reward: the share of arithmetic steps in the chain of thought that are right."""

    all_or_nothing: bool = Field(
        False, description="1 only when every step is right (else 0), instead of the share of right steps"
    )
