"""Configs of the built-in trainers (torch-free: imported by ``dsk recipe validate``).

``[trainer] type = "pretrain"`` or ``"sft"``; every option below is a key of that table::

    [trainer]
    type = "pretrain"
    steps = 600
    batch_size = 32

The optimizer and its learning-rate schedule are the ``[optimizer]`` section's (recipe schema 2).
"""

from __future__ import annotations

from pydantic import Field

from dsk.api import BaseConfig

__all__ = ["LMTrainerConfig", "PretrainConfig", "SFTConfig"]


class LMTrainerConfig(BaseConfig):
    """Options shared by the next-token trainers (pre-training and SFT)."""

    steps: int = Field(100, ge=1, description="optimizer steps of this run (or stage)")
    batch_size: int = Field(
        16, ge=1, description="rows per micro-batch; rows per optimizer step = batch_size * grad_accum * world size"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated into one optimizer step")
    seq_len: int = Field(
        128, ge=2, description="most tokens per row, BOS and EOS included (longer examples are truncated)"
    )
    packing: bool = Field(
        False,
        description="pack several examples into each row of seq_len tokens (attention stays within each example)",
    )
    eval_every: int = Field(0, ge=0, description="evaluate on the task's test split every N steps (0: only at the end)")
    eval_samples: int = Field(
        100,
        ge=0,
        description="distinct test problems per evaluation (greedy accuracy), or test records of text data (held-out "
        "loss eval/loss and perplexity eval/ppl); 0: no evaluation",
    )
    eval_batch_size: int = Field(256, ge=1, description="prompts generated together during evaluation")
    eval_max_new_tokens: int = Field(64, ge=1, description="most tokens generated per test prompt")
    pass_k: int = Field(0, ge=0, description="also report pass@k with k samples per prompt (0: off)")
    pass_k_temperature: float = Field(0.8, gt=0, description="sampling temperature of the pass@k samples")
    max_nonfinite: int = Field(
        5, ge=1, description="stop the run after this many optimizer steps in a row with a non-finite loss or gradient"
    )
    device: str = Field("auto", description="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1...")
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads for this run (unset: torch's default, one per core); tiny models gain "
        "little from several threads, and busy threads spin-wait badly on a loaded machine",
    )
    debug_nonfinite_steps: list[int] = Field(
        default_factory=list,
        description="testing aid: make the loss of these optimizer steps (1-based) NaN, to exercise the skip logic",
    )


class PretrainConfig(LMTrainerConfig):
    """Next-token pre-training: every token of a record is a target (task records: prompt + completion)."""


class SFTConfig(LMTrainerConfig):
    """Supervised fine-tuning: only completion tokens (and the closing EOS) are targets; the prompt is masked."""
