"""A tiny GRPO recipe and a run-context builder for the trainer tests (no CLI, no run directory layout)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

TINY_GRPO = """\
[dsk]
seed = 0

[model]
dim = 32
n_layers = 2
first_k_dense = 1
max_seq_len = 40

[model.attention]
type = "mla"
n_heads = 2
q_lora_rank = 16
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 4
v_head_dim = 8

[model.ffn]
type = "moe"
n_routed_experts = 4
n_shared_experts = 1
expert_hidden_dim = 16

[model.ffn.router]
type = "noaux_tc"
top_k = 2

[model.dense_ffn]
type = "dense"
hidden_dim = 64

[model.mtp]
type = "mtp"
depth = 1

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
lr = 1e-2
eval_samples = 0

[trainer.rewards.accuracy]
[trainer.rewards.format]
require_think = false
weight = 0.5
"""


def grpo_table(**trainer: Any) -> dict[str, Any]:
    """The tiny GRPO recipe as a table, with trainer options replaced."""
    from dsk.recipe.load import tomllib

    table = copy.deepcopy(tomllib.loads(TINY_GRPO))
    table["trainer"].update(trainer)
    return table


def make_context(tmp_path: Path, table: dict[str, Any], registry: Any, pm: Any, **kwargs: Any):
    """A :class:`RunContext` for ``table`` writing into ``tmp_path`` (progress display off)."""
    from dsk.recipe import Recipe, validate_recipe
    from dsk.train.context import RunContext
    from dsk.train.metrics import MetricsWriter
    from dsk.train.progress import Reporter

    result = validate_recipe(Recipe(data=copy.deepcopy(table)), registry, check=True)
    sections = result.resolved
    return RunContext(
        run_dir=Path(tmp_path),
        sections=sections,
        registry=registry,
        pm=pm,
        metrics=MetricsWriter(Path(tmp_path) / "metrics.jsonl"),
        reporter=Reporter(_NullConsole(), enabled=False),
        seed=sections["dsk"].seed,
        **kwargs,
    )


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


class _NullConsole:
    is_terminal = False

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass
