"""The ``recompute`` feature through the recipe and the CLI: options, errors with key paths, a few-step train."""

from __future__ import annotations

import pytest
from dsk_recompute.config import DEFAULT_REGIONS, RecomputeConfig
from pydantic import ValidationError

from dsk.train.checkpoint import load_checkpoint
from dsk.train.metrics import read_metrics
from tests.e2e.test_reliability import _run
from tests.unit.train.helpers import write_recipe


def test_selective_is_the_default_and_recomputes_deepseek_v3s_regions_and_the_moe_gather():
    cfg = RecomputeConfig()
    assert cfg.mode == "selective" and cfg.method == "regions"
    regions = ("norm", "attention.up_projection", "ffn.activation", "ffn.dispatch")
    assert cfg.recompute_regions() == DEFAULT_REGIONS == regions
    assert RecomputeConfig(regions=["norm"]).recompute_regions() == ("norm",)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"mode": "partial"}, "'selective' or 'full'"),
        ({"mode": "full", "regions": ["norm"]}, "option of mode = 'selective'"),
        ({"regions": ["norm", " "]}, "non-empty name"),
        ({"every": 2}, "every"),
    ],
)
def test_bad_options_are_rejected_naming_the_value(table, message):
    with pytest.raises(ValidationError, match=message):
        RecomputeConfig(**table)


@pytest.mark.xdist_group("subprocess-train")
def test_bad_option_is_a_recipe_error_with_the_key_path(tmp_path):
    recipe = write_recipe(tmp_path)
    result = _run(["recipe", "validate", recipe, "--set", "features.recompute.mode=partial"])
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "features.recompute.mode" in out and "partial" in out and "Traceback" not in out


@pytest.mark.xdist_group("subprocess-train")
def test_cli_train_with_recompute_is_deterministic_and_has_the_losses_of_the_run_without(tmp_path):
    recipe = write_recipe(tmp_path)
    common = ["--set", "trainer.steps=6", "--set", "trainer.eval_samples=2", "--set", "checkpoint.every=6"]
    runs = {
        "none": [],
        "selective": ["--set", 'features.recompute.mode="selective"'],
        "full": ["--set", 'features.recompute.mode="full"'],
    }
    losses, keys = {}, {}
    for name, extra in runs.items():
        run_dir = tmp_path / name
        result = _run(["train", recipe, "--run-dir", run_dir, *common, *extra])
        assert result.returncode == 0, result.stderr
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
        losses[name] = [(r["loss"], r["grad_norm"], r["aux_loss"], r["moe/maxvio"]) for r in rows]
        keys[name] = sorted(load_checkpoint(run_dir).model_state)
        if name != "none":
            assert "[features.recompute]" in (run_dir / "resolved.toml").read_text()
    assert len(losses["none"]) == 6
    # three processes, bit for bit the same numbers: deterministic, and the losses of the run without recompute
    assert losses["selective"] == losses["full"] == losses["none"]
    assert keys["selective"] == keys["full"] == keys["none"]
