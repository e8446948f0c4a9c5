"""Warm-up + cosine learning-rate schedule."""

import math

import pytest

from dsk.train.schedule import lr_at


def _lr(step, **kw):
    args = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110, schedule="cosine")
    args.update(kw)
    return lr_at(step, **args)


def test_warmup_rises_linearly_to_the_peak():
    assert _lr(1) == pytest.approx(0.1)
    assert _lr(5) == pytest.approx(0.5)
    assert _lr(10) == pytest.approx(1.0)


def test_cosine_reaches_min_lr_at_the_last_step_and_the_midpoint_halfway():
    assert _lr(110) == pytest.approx(0.1)
    assert _lr(60) == pytest.approx(0.55)  # halfway through the decay: (lr + min_lr) / 2
    assert _lr(11) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 100)))


def test_cosine_decreases_monotonically_after_warmup():
    values = [_lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_constant_schedule_holds_the_peak_after_warmup():
    assert _lr(50, schedule="constant") == 1.0
    assert _lr(110, schedule="constant") == 1.0


def test_no_warmup_starts_at_the_peak():
    assert _lr(1, warmup_steps=0) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 110)))


@pytest.mark.parametrize("step", [0, 111])
def test_step_outside_the_run_is_an_error(step):
    with pytest.raises(ValueError, match="must be in 1..110"):
        _lr(step)
