"""Run-directory rules of the runner: default names, recipe identity on resume, stage plans."""

import re
from pathlib import Path

import pytest

from dsk.train.context import RunSetupError
from dsk.train.runner import _same_recipe, default_run_dir, plan_stages, prepare_run_dir
from tests.unit.train.helpers import TINY_RECIPE, validated

STAGES = TINY_RECIPE + '\n[[stages]]\nname = "a"\n\n[[stages]]\nname = "b"\n[stages.trainer]\ntype = "sft"\n'


def test_default_run_dir_is_recipe_stem_and_time():
    path = default_run_dir("recipes/quickstart.toml")
    assert path.parent == Path("runs")
    assert re.fullmatch(r"quickstart-\d{8}-\d{6}", path.name)


def test_resolved_recipes_compare_as_data_not_text():
    assert _same_recipe("[a]\nx = 1\n[b]\ny = 2\n", "[b]\ny = 2\n[a]\nx = 1\n")
    assert not _same_recipe("[a]\nx = 1\n", "[a]\nx = 2\n")


def test_stage_plans_put_each_stage_in_its_own_directory(tmp_path, dsk_registry):
    from dsk.recipe.load import tomllib

    plans = plan_stages(validated(tomllib.loads(STAGES), dsk_registry), tmp_path)
    assert [(p.name, p.index, p.dir) for p in plans] == [
        ("a", 0, tmp_path / "stages" / "a"),
        ("b", 1, tmp_path / "stages" / "b"),
    ]
    assert plans[1].sections["trainer"].name == "sft" and plans[0].sections["trainer"].name == "pretrain"


def test_prepare_refuses_resume_without_a_run_and_unknown_stages(tmp_path, dsk_registry):
    from dsk.recipe.load import tomllib

    result = validated(tomllib.loads(STAGES), dsk_registry)
    with pytest.raises(RunSetupError, match="holds no run to resume"):
        prepare_run_dir(result, tmp_path / "run", resume=True, stage=None)
    with pytest.raises(RunSetupError, match="no such stage; the recipe's stages are a, b"):
        prepare_run_dir(result, tmp_path / "run", resume=False, stage="c")
    assert not (tmp_path / "run").exists()
    plans = prepare_run_dir(result, tmp_path / "run", resume=False, stage=None)
    assert (tmp_path / "run" / "resolved.toml").exists() and len(plans) == 2
