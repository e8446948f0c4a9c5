"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr`` (or a constant rate)."""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
) -> float:
    """Learning rate of optimizer step ``step`` (1-based: the first update is step 1).

    Warm-up: ``lr * step / warmup_steps`` for ``step <= warmup_steps`` (step 1 already moves the weights; a zero
    first rate would waste a step). After it, ``cosine`` goes from ``lr`` to ``min_lr`` along half a cosine so that
    the last step (``total_steps``) runs at exactly ``min_lr``; ``constant`` stays at ``lr``.

    Raises:
        ValueError: ``step`` outside ``1..total_steps`` or an unknown schedule.
    """
    if not 1 <= step <= total_steps:
        raise ValueError(f"step = {step}: must be in 1..{total_steps}")
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"schedule = {schedule!r}: must be 'cosine' or 'constant'")
    decay_steps = total_steps - warmup_steps
    progress = (step - warmup_steps) / decay_steps  # in (0, 1]
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
