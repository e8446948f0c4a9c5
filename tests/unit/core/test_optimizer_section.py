"""The ``[optimizer]`` section (recipe schema 2): a component with shared schedule options, trainer defaults,
stage replacement, and clear errors for schema-1 recipes."""

from __future__ import annotations

from dsk.recipe import Recipe, validate_recipe
from dsk.testing import builtin_registry, run_dsk

BASE = {
    "model": {"dim": 32, "n_layers": 2},
    "data": {"type": "arithmetic"},
}


def _problems(table):
    return validate_recipe(Recipe(data=table), builtin_registry()).problems


def test_a_recipe_without_optimizer_gets_adamw_with_the_trainers_defaults():
    lm = validate_recipe(Recipe(data={**BASE, "trainer": {"type": "pretrain"}}), builtin_registry())
    rl = validate_recipe(
        Recipe(data={**BASE, "trainer": {"type": "grpo", "rewards": {"accuracy": {}}}}), builtin_registry()
    )
    assert lm.ok and rl.ok
    assert lm.resolved["optimizer"].name == "adamw"
    assert (lm.resolved["optimizer"].config.schedule, lm.resolved["optimizer"].config.betas) == ("cosine", (0.9, 0.95))
    # the RL trainers declare TRL's defaults under the recipe's keys
    assert (rl.resolved["optimizer"].config.schedule, rl.resolved["optimizer"].config.lr) == ("constant", 1e-4)
    rl2 = validate_recipe(
        Recipe(data={**BASE, "trainer": {"type": "grpo", "rewards": {"accuracy": {}}}, "optimizer": {"lr": 5e-5}}),
        builtin_registry(),
    )
    assert (rl2.resolved["optimizer"].config.lr, rl2.resolved["optimizer"].config.weight_decay) == (5e-5, 0.0)


def test_schema_1_optimizer_keys_in_trainer_name_where_they_moved():
    problems = _problems({**BASE, "trainer": {"type": "pretrain", "lr": 3e-3, "warmup_steps": 30, "steps": 5}})
    by_path = {p.path: p for p in problems}
    assert set(by_path) == {"trainer.lr", "trainer.warmup_steps"}
    assert "moved from [trainer] to [optimizer]" in by_path["trainer.lr"].message
    assert by_path["trainer.lr"].hint == "write it as [optimizer] lr = 0.003"


def test_schema_1_is_refused_with_what_changed():
    problems = _problems({**BASE, "dsk": {"schema": 1}, "trainer": {"type": "pretrain"}})
    assert [p.path for p in problems] == ["dsk.schema"]
    assert "[optimizer]" in problems[0].message


def test_a_stage_optimizer_replaces_the_base_one():
    table = {
        **BASE,
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 30},
        "stages": [
            {"name": "pre", "trainer": {"type": "pretrain"}},
            {"name": "rl", "trainer": {"type": "grpo", "rewards": {"accuracy": {}}}, "optimizer": {"lr": 5e-5}},
        ],
    }
    result = validate_recipe(Recipe(data=table), builtin_registry())
    assert result.ok, result.problems
    pre, rl = (sections["optimizer"].config for _, sections in result.stages)
    assert (pre.lr, pre.warmup_steps) == (3e-3, 30)
    assert (rl.lr, rl.min_lr, rl.warmup_steps, rl.schedule) == (5e-5, 1e-5, 0, "constant")


def test_components_lists_the_optimizer_kind():
    result = run_dsk(["components", "optimizer", "--json"])
    assert result.exit_code == 0, result.output
    assert "adamw" in result.stdout
