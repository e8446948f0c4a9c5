"""Recipes: layering with extends, overrides, slot replacement, provenance and every validation error path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dsk.plugins import make_plugin_manager
from dsk.recipe import RecipeError, load_recipe, validate_recipe
from dsk.registry import build_registry

from . import toy_plugin


@pytest.fixture
def registry():
    return build_registry(make_plugin_manager(entrypoints=False, plugins=[toy_plugin]))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(recipe, registry, **kw):
    return validate_recipe(recipe, registry, **kw).problems


def test_extends_paths_resolve_against_the_declaring_file(tmp_path):
    write(tmp_path / "base" / "core.toml", "[trainer]\ntype = 'toy_trainer'\nsteps = 5\nlr = 0.1\n")
    write(tmp_path / "base" / "mid.toml", "[dsk]\nextends = 'core.toml'\n[trainer]\nsteps = 7\n")
    top = write(tmp_path / "exp" / "top.toml", "[dsk]\nextends = ['../base/mid.toml']\n[trainer]\nlr = 0.5\n")
    recipe = load_recipe(top)
    assert recipe.data["trainer"] == {"type": "toy_trainer", "steps": 7, "lr": 0.5}
    assert "extends" not in recipe.data.get("dsk", {})
    assert recipe.origin(("trainer", "steps")).endswith("mid.toml")
    assert recipe.origin(("trainer", "lr")).endswith("top.toml")
    assert recipe.origin(("trainer", "type")).endswith("core.toml")


def test_several_extends_apply_in_order_then_the_file_itself(tmp_path):
    write(tmp_path / "a.toml", "[trainer]\ntype = 'toy_trainer'\nsteps = 1\nlr = 0.1\n")
    write(tmp_path / "b.toml", "[trainer]\nsteps = 2\n")
    top = write(tmp_path / "top.toml", "[dsk]\nextends = ['a.toml', 'b.toml']\n[trainer]\nlr = 0.3\n")
    assert load_recipe(top).data["trainer"] == {"type": "toy_trainer", "steps": 2, "lr": 0.3}


def test_cycle_in_extends_is_reported_with_the_chain(tmp_path):
    write(tmp_path / "a.toml", "[dsk]\nextends = 'b.toml'\n")
    write(tmp_path / "b.toml", "[dsk]\nextends = 'c.toml'\n")
    write(tmp_path / "c.toml", "[dsk]\nextends = 'a.toml'\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "a.toml")
    msg = err.value.problems[0].message
    assert "cycle in extends" in msg
    assert msg.count("a.toml") == 2 and "b.toml" in msg and "c.toml" in msg


def test_missing_extends_target_names_the_declaring_file(tmp_path):
    top = write(tmp_path / "top.toml", "[dsk]\nextends = 'nope.toml'\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(top)
    assert "top.toml extends 'nope.toml', which does not exist" in err.value.problems[0].message


def test_bad_toml_names_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.toml", "[trainer]\ntype = 'toy_trainer'\nsteps = = 3\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    msg = err.value.problems[0].message
    assert "bad.toml" in msg and "invalid TOML" in msg and "line 3" in msg


def test_changing_a_slot_type_in_a_later_layer_replaces_the_slot(tmp_path):
    write(tmp_path / "a.toml", "[trainer]\ntype = 'toy_trainer'\nsteps = 3\n[data]\ntype = 'toy_task'\ndigits = 4\n")
    top = write(tmp_path / "top.toml", "[dsk]\nextends = 'a.toml'\n[data]\ntype = 'other'\n")
    recipe = load_recipe(top)
    assert recipe.data["data"] == {"type": "other"}
    assert ("data", "digits") not in recipe.origins


def test_set_parses_toml_values_and_falls_back_to_strings(tmp_path):
    top = write(tmp_path / "top.toml", "[trainer]\ntype = 'toy_trainer'\n")
    recipe = load_recipe(
        top,
        sets=[
            "trainer.steps=12",
            "trainer.lr=1e-4",
            "features.toy_feature.block_size=64",
            "dsk.description=hello world",
            "plugins.x.flags=[1, 2]",
            "plugins.x.on=true",
            'plugins.x.q="10"',
        ],
    )
    assert recipe.data["trainer"]["steps"] == 12 and recipe.data["trainer"]["lr"] == 1e-4
    assert recipe.data["features"]["toy_feature"]["block_size"] == 64
    assert recipe.data["dsk"]["description"] == "hello world"
    assert recipe.data["plugins"]["x"] == {"flags": [1, 2], "on": True, "q": "10"}
    assert recipe.origin(("trainer", "lr")) == "--set #2"


def test_set_type_resets_the_slot_options(tmp_path):
    top = write(tmp_path / "top.toml", "[data]\ntype = 'toy_task'\ndigits = 4\n")
    recipe = load_recipe(top, sets=["data.type=other_task"])
    assert recipe.data["data"] == {"type": "other_task"}


def test_set_and_unset_apply_in_command_line_order(tmp_path):
    top = write(tmp_path / "top.toml", "[trainer]\ntype = 'toy_trainer'\nsteps = 3\n")
    r1 = load_recipe(top, overrides=[("unset", "trainer.steps"), ("set", "trainer.steps=9")])
    assert r1.data["trainer"]["steps"] == 9
    r2 = load_recipe(top, overrides=[("set", "trainer.steps=9"), ("unset", "trainer.steps")])
    assert "steps" not in r2.data["trainer"]


def test_unset_removes_an_inherited_table_and_unknown_paths_suggest(tmp_path):
    top = write(tmp_path / "top.toml", "[features.toy_feature]\nblock_size = 64\n[trainer]\ntype = 'toy_trainer'\n")
    assert "features" in load_recipe(top).data
    assert load_recipe(top, unsets=["features.toy_feature"]).data["features"] == {}
    with pytest.raises(RecipeError) as err:
        load_recipe(top, unsets=["features.toy_featur"])
    problem = err.value.problems[0]
    assert problem.path == "features.toy_featur"
    assert "did you mean 'features.toy_feature'" in problem.hint


def test_malformed_overrides_are_collected(tmp_path):
    top = write(tmp_path / "top.toml", "[trainer]\ntype = 'toy_trainer'\nsteps = 3\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(top, sets=["trainer.steps", "a..b=1", "trainer.steps.x=1"])
    msgs = [p.message for p in err.value.problems]
    assert len(msgs) == 3
    assert "is not KEY=VALUE" in msgs[0]
    assert "malformed key path" in msgs[1]
    assert "is a value, not a table" in msgs[2]


def test_config_files_layer_above_the_recipe(tmp_path):
    top = write(tmp_path / "top.toml", "[trainer]\ntype = 'toy_trainer'\nsteps = 3\n")
    extra = write(tmp_path / "extra.toml", "[trainer]\nsteps = 30\n")
    recipe = load_recipe(top, configs=[str(extra)], sets=["trainer.lr=0.2"])
    assert recipe.data["trainer"]["steps"] == 30
    assert recipe.origin(("trainer", "steps")) == f"--config {extra}" or "extra.toml" in recipe.origin(
        ("trainer", "steps")
    )


def test_every_problem_is_reported_at_once_with_paths_and_suggestions(tmp_path, registry):
    top = write(
        tmp_path / "top.toml",
        """
        [trainr]
        steps = 1
        [trainer]
        type = "toy_trainer"
        stepz = 4
        lr = -1.0
        [data]
        type = "toy_tsk"
        [features.toy_feature]
        block_size = "big"
        [features.mystery]
        x = 1
        """,
    )
    problems = problems_of(load_recipe(top), registry)
    by_path = {p.path: p for p in problems}
    assert set(by_path) >= {
        "trainr",
        "trainer.stepz",
        "trainer.lr",
        "data.type",
        "features.toy_feature.block_size",
        "features.mystery",
    }
    assert "did you mean 'trainer'" in by_path["trainr"].hint
    assert "unknown option 'stepz' for trainer 'toy_trainer'" in by_path["trainer.stepz"].message
    assert "did you mean 'steps'" in by_path["trainer.stepz"].hint
    assert "greater than 0" in by_path["trainer.lr"].message
    assert "unknown task 'toy_tsk'" in by_path["data.type"].message
    assert "did you mean 'toy_task'" in by_path["data.type"].hint
    assert "valid integer" in by_path["features.toy_feature.block_size"].message
    assert "unknown feature 'mystery'" in by_path["features.mystery"].message


def test_nested_slot_errors_carry_the_nested_path(tmp_path, registry):
    top = write(
        tmp_path / "top.toml",
        """
        [plugins.anything]
        x = 1
        [trainer]
        type = "toy_trainer"
        [trainer.rewards.toy_reward]
        weight = "heavy"
        [trainer.rewards.unknown_reward]
        weight = 1.0
        """,
    )
    problems = problems_of(load_recipe(top), registry)
    paths = {p.path for p in problems}
    assert "trainer.rewards.toy_reward.weight" in paths
    assert "trainer.rewards.unknown_reward" in paths


def test_nested_router_slot_and_cross_field_validator(tmp_path, registry):
    from dsk.recipe.validate import validate_slot

    slot, problems = validate_slot(
        registry, "ffn", {"type": "toy_moe", "n_experts": 2, "router": {"top_k": 4}}, "model.ffn"
    )
    assert slot is None
    assert any("exceeds n_experts" in p.message for p in problems)
    slot, problems = validate_slot(
        registry, "ffn", {"type": "toy_moe", "router": {"type": "toy_router", "top_k": 0}}, "model.ffn"
    )
    assert [p.path for p in problems] == ["model.ffn.router.top_k"]
    slot, problems = validate_slot(registry, "ffn", {"type": "toy_moe"}, "model.ffn")
    assert not problems and slot.config.router.name == "toy_router" and slot.config.router.config.top_k == 2


def test_feature_enabled_false_drops_an_inherited_feature(tmp_path, registry):
    top = write(tmp_path / "top.toml", "[features.toy_feature]\nenabled = false\nblock_size = 'not checked'\n")
    result = validate_recipe(load_recipe(top), registry)
    assert result.ok and result.resolved["features"] == {}
    bad = write(tmp_path / "bad.toml", "[features.toy_feature]\nenabled = 'yes'\n")
    assert problems_of(load_recipe(bad), registry)[0].path == "features.toy_feature.enabled"


def test_wrong_section_types_are_problems_not_crashes(tmp_path, registry):
    top = write(tmp_path / "top.toml", "trainer = 5\nfeatures = [1, 2]\nstages = 'x'\n[dsk]\nseed = 'abc'\n")
    problems = problems_of(load_recipe(top), registry)
    assert {p.path for p in problems} >= {"trainer", "features", "stages", "dsk.seed"}


def test_stages_are_validated_each_on_top_of_the_base(tmp_path, registry):
    top = write(
        tmp_path / "top.toml",
        """
        [trainer]
        type = "toy_trainer"
        [[stages]]
        name = "cold_start"
        trainer = { steps = 5 }
        [[stages]]
        name = "rl"
        trainer = { stepz = 5 }
        [[stages]]
        name = "rl"
        datta = { type = "toy_task" }
        """,
    )
    result = validate_recipe(load_recipe(top), registry)
    paths = {p.path for p in result.problems}
    assert "stages[1].trainer.stepz" in paths
    assert "stages[2].name" in paths  # duplicate
    assert "stages[2].datta" in paths
    assert result.stages[0][0] == "cold_start" and result.stages[0][1]["trainer"].config.steps == 5


def test_required_sections_and_plugin_cross_checks(tmp_path, registry):
    top = write(
        tmp_path / "top.toml", "[features.toy_feature]\nblock_size = 1024\n[trainer]\ntype='toy_trainer'\nsteps=2\n"
    )
    pm = make_plugin_manager(entrypoints=False, plugins=[toy_plugin])
    result = validate_recipe(load_recipe(top), registry, pm, require=("model",))
    paths = [p.path for p in result.problems]
    assert paths == ["model"]
    result = validate_recipe(load_recipe(top), registry, pm)
    assert [p.path for p in result.problems] == ["features.toy_feature.block_size"]


def test_ambiguous_component_in_a_recipe_asks_for_provider(tmp_path):
    from dsk import hookimpl

    class A:
        __name__ = "prov_a"

        @hookimpl
        def register_tasks(self, register):
            register("task", "dup_task", "os:getcwd")

    class B(A):
        __name__ = "prov_b"

    pm = make_plugin_manager(entrypoints=False, plugins=[A(), B()])
    registry = build_registry(pm)
    top = write(tmp_path / "top.toml", "[data]\ntype = 'dup_task'\n")
    problems = problems_of(load_recipe(top), registry)
    assert "provided by both" in problems[0].message
    ok = write(tmp_path / "ok.toml", "[data]\ntype = 'prov_b:dup_task'\n")
    result = validate_recipe(load_recipe(ok), registry)
    assert result.ok and result.resolved["data"].provider == "prov_b"


def test_set_and_unset_pick_a_stage_by_its_name_or_index(tmp_path):
    top = write(
        tmp_path / "top.toml",
        """
        [[stages]]
        name = "pretrain"
        trainer = { steps = 5 }
        [[stages]]
        name = "grpo"
        trainer = { steps = 50, eval_every = 10 }
        """,
    )
    by_name = load_recipe(
        top, overrides=[("set", "stages.grpo.trainer.steps=150"), ("unset", "stages.grpo.trainer.eval_every")]
    )
    by_index = load_recipe(
        top, overrides=[("set", "stages.1.trainer.steps=150"), ("unset", "stages.1.trainer.eval_every")]
    )
    assert by_name.data["stages"] == by_index.data["stages"]
    assert by_name.data["stages"][1]["trainer"] == {"steps": 150}
    assert by_name.data["stages"][0]["trainer"] == {"steps": 5}
    with pytest.raises(RecipeError, match=r"stages.grpx: no element named 'grpx' \(pretrain, grpo\)"):
        load_recipe(top, overrides=[("set", "stages.grpx.trainer.steps=1")])
