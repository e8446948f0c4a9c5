"""A tiny GRPO recipe and a set-up GRPO run for the trainer tests (no CLI, no run directory layout)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tests.unit.train.helpers import make_context, tiny_model

TINY_GRPO = (
    tiny_model(40)
    + """\
[data]
type = "modular"
modulus = 5
max_operand = 9
trace = false
test_size = 8

[trainer]
type = "grpo"
steps = 2
prompts_per_step = 4
num_generations = 4
micro_batch_size = 8
max_completion_length = 6
eval_samples = 0

[trainer.rewards.accuracy]
[trainer.rewards.format]
require_think = false
weight = 0.5

[optimizer]
lr = 1e-2
"""
)


def grpo_table(**trainer: Any) -> dict[str, Any]:
    """The tiny GRPO recipe as a table, with trainer options replaced (``lr`` goes to ``[optimizer]``)."""
    from dsk.recipe.load import tomllib

    table = copy.deepcopy(tomllib.loads(TINY_GRPO))
    if "lr" in trainer:
        table["optimizer"]["lr"] = trainer.pop("lr")
    table["trainer"].update(trainer)
    return table


def make_grpo_run(tmp_path: Path, table: dict[str, Any], registry: Any, pm: Any, **kwargs: Any):
    """A set-up ``_GRPORun`` ready to step."""
    from dsk_rl.grpo import _GRPORun

    ctx = make_context(tmp_path, table, registry, pm, **kwargs)
    run = _GRPORun(ctx.sections["trainer"].build(), ctx)
    run.setup()
    return run


def parameters(model: Any) -> dict[str, Any]:
    """Detached copies of the trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
