"""The feature contract end to end: a plugin feature acting in every stage, its state through kill -9 and --resume,
and the declared order's cycles and conflicts as recipe errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsk.train.checkpoint import latest_checkpoint, load_checkpoint
from dsk.train.metrics import read_metrics
from tests.e2e.test_reliability import _run, _start, _wait_for
from tests.unit.train.helpers import write_recipe

pytestmark = pytest.mark.xdist_group("subprocess-train")

PLUGIN = str(Path(__file__).with_name("probe_feature.py"))


def _args(recipe: Path, run_dir: Path, *extra: str) -> list:
    return [
        "--plugin", PLUGIN, "train", recipe, "--run-dir", run_dir, "--set", "trainer.eval_samples=2",
        "--set", "features.probe.decay=0.5", "--set", "checkpoint.every=2", *extra,
    ]  # fmt: skip


def _rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_a_feature_acts_in_every_stage_and_its_state_survives_kill_and_resume(tmp_path):
    recipe = write_recipe(tmp_path)
    straight, killed, plain = tmp_path / "straight", tmp_path / "killed", tmp_path / "plain"
    reference = _run(_args(recipe, straight, "--set", "features.probe.embed_scale=3.0"))
    assert reference.returncode == 0, reference.stderr
    rows = _rows(straight)
    assert [r["probe/count"] for r in rows] == list(range(1, 13))  # after_step ran once per update
    assert [r["probe/before"] for r in rows] == list(range(1, 13))  # before_step too
    ckpt = load_checkpoint(straight)
    assert ckpt.state["features"]["probe"] == {"count": 12, "before": 12}
    assert ckpt.feature_state["probe"]["ema"].shape == ckpt.model_state["lm_head.weight"].shape
    # transform_model's effect shows in the losses: without the feature the run is another run
    without = _run(
        ["train", recipe, "--run-dir", plain, "--set", "trainer.eval_samples=2", "--set", "checkpoint.every=2"]
    )
    assert without.returncode == 0, without.stderr
    assert _rows(plain)[0]["loss"] != rows[0]["loss"]

    proc = _start(_args(recipe, killed, "--set", "features.probe.embed_scale=3.0"), DSK_DEBUG_SAVE_DELAY="1:4")
    _wait_for(lambda: latest_checkpoint(killed) is not None and latest_checkpoint(killed).name == "step-6", proc)
    proc.kill()
    proc.wait(timeout=30)
    resumed = _run([*_args(recipe, killed, "--set", "features.probe.embed_scale=3.0"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    got = _rows(killed)
    keys = ("step", "loss", "probe/count", "probe/before", "probe/ema_norm")
    assert [tuple(r[k] for k in keys) for r in got] == [tuple(r[k] for k in keys) for r in rows]
    a, b = load_checkpoint(straight).feature_state["probe"], load_checkpoint(killed).feature_state["probe"]
    assert a["ema"].equal(b["ema"]) and a["count"] == b["count"] == 12


def test_a_feature_order_cycle_is_a_recipe_error_with_the_key_path(tmp_path, dsk_cli):
    recipe = write_recipe(tmp_path)
    result = _run(["--plugin", PLUGIN, "recipe", "validate", recipe, "--set", "features.cycle_a.enabled=true",
                   "--set", "features.cycle_b.enabled=true"])  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "features.cycle_a" in out and "cycle" in out and "Traceback" not in out


def test_conflicting_features_are_a_recipe_error(tmp_path):
    recipe = write_recipe(tmp_path)
    result = _run(["--plugin", PLUGIN, "recipe", "validate", recipe, "--set", "features.probe.decay=0.5",
                   "--set", "features.loner.enabled=true"])  # fmt: skip
    assert result.returncode == 2
    assert "features.loner" in result.stdout + result.stderr and "cannot run together" in result.stdout + result.stderr
