"""A tiny recipe and run-context builders shared by the trainer unit tests and the end-to-end tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def tiny_model(max_seq_len: int) -> str:
    """The ``[dsk]`` seed and ``[model]`` sections of the tiny test recipes (MLA, MoE, MTP), ending in a blank line."""
    return f"""\
[dsk]
seed = 0

[model]
dim = 32
n_layers = 2
first_k_dense = 1
max_seq_len = {max_seq_len}

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

"""


TINY_RECIPE = (
    tiny_model(48)
    + """\
[data]
type = "arithmetic"
min_digits = 1
max_digits = 2
ops = ["+"]
test_size = 8

[trainer]
type = "pretrain"
steps = 12
batch_size = 8
seq_len = 40
eval_samples = 8
eval_max_new_tokens = 32

[optimizer]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2

[checkpoint]
every = 4
keep = 2
"""
)


def write_recipe(directory: Path, text: str = TINY_RECIPE, name: str = "tiny.toml") -> Path:
    """Write a recipe file and return its path."""
    path = Path(directory) / name
    path.write_text(text, encoding="utf-8")
    return path


def tiny_table() -> dict[str, Any]:
    """The tiny recipe as a plain table (a fresh copy)."""
    from dsk.recipe.load import tomllib

    return copy.deepcopy(tomllib.loads(TINY_RECIPE))


def validated(table: dict[str, Any], registry: Any) -> Any:
    """Validate a recipe table against ``registry`` (raises on problems)."""
    from dsk.recipe import Recipe, validate_recipe

    return validate_recipe(Recipe(data=copy.deepcopy(table)), registry, check=True)


def make_context(tmp_path: Path, table: dict[str, Any], registry: Any, pm: Any, **kwargs: Any):
    """A :class:`RunContext` for ``table`` writing into ``tmp_path`` (progress display off)."""
    from dsk.train.context import RunContext
    from dsk.train.metrics import MetricsWriter
    from dsk.train.progress import Reporter

    sections = validated(table, registry).resolved
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


def make_run(tmp_path: Path, table: dict[str, Any], registry: Any, pm: Any, *, resume_from: Path | None = None):
    """A trainer run (``dsk_trainers.lm._Run``) on ``table`` writing into ``tmp_path``, set up and ready to step."""
    from dsk_trainers.lm import _Run

    ctx = make_context(tmp_path, table, registry, pm, resume_from=resume_from)
    run = _Run(ctx.sections["trainer"].build(), ctx)
    run.setup()
    return run


class _NullConsole:
    is_terminal = False

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass
