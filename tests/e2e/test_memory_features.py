"""dsk_memory through the CLI: kill -9 then --resume with ema + offload + adamw_bf16 continues exactly (losses, EMA
tensors, BF16 moments), ``dsk eval --ema`` / ``dsk generate --ema``, and a [[stages]] recipe where each stage
starts its own EMA from its initial weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsk.train.checkpoint import latest_checkpoint, load_checkpoint
from dsk.train.metrics import read_metrics
from tests.e2e.test_reliability import _run, _start, _wait_for
from tests.unit.train.helpers import TINY_RECIPE, write_recipe

pytestmark = pytest.mark.xdist_group("subprocess-train")

FEATURES = ("--set", "features.ema.decay=0.9", "--set", "features.offload.enabled=true",
            "--set", "optimizer.type=adamw_bf16")  # fmt: skip


def _args(recipe: Path, run_dir: Path, *extra: str) -> list:
    return ["train", recipe, "--run-dir", run_dir, "--set", "trainer.eval_samples=2", "--set", "checkpoint.every=2",
            *FEATURES, *extra]  # fmt: skip


def _losses(run_dir: Path) -> list[tuple]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


def test_kill_9_then_resume_continues_with_exactly_the_ema_losses_and_bf16_moments(tmp_path):
    recipe = write_recipe(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = _run(_args(recipe, straight))
    assert reference.returncode == 0, reference.stderr
    proc = _start(_args(recipe, killed), DSK_DEBUG_SAVE_DELAY="1:4")
    _wait_for(lambda: latest_checkpoint(killed) is not None and latest_checkpoint(killed).name == "step-6", proc)
    proc.kill()  # SIGKILL, mid-run (the save of step 8 is held open)
    proc.wait(timeout=30)
    resumed = _run([*_args(recipe, killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert _losses(killed) == _losses(straight) and len(_losses(straight)) == 12
    a, b = load_checkpoint(straight), load_checkpoint(killed)
    assert a.step == b.step == 12
    ema_a, ema_b = a.feature_state["ema"], b.feature_state["ema"]
    assert ema_a["updates"] == ema_b["updates"] == 12
    weights = [k for k in ema_a if k.startswith("weights/")]
    assert weights and sorted(weights) == sorted(k for k in ema_b if k.startswith("weights/"))
    for key in weights:
        assert ema_a[key].dtype == torch.float32 and torch.equal(ema_a[key], ema_b[key]), key  # bitwise
    assert a.optimizer_meta["class"] == "CPUOffloadOptimizer"
    moments = [k for k in b.optimizer_tensors if k.endswith(("/exp_avg", "/exp_avg_sq"))]
    assert moments
    for key in moments:
        assert b.optimizer_tensors[key].dtype == torch.bfloat16, key
        assert torch.equal(a.optimizer_tensors[key], b.optimizer_tensors[key]), key
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name


def test_eval_and_generate_use_the_ema_weights_and_refuse_a_checkpoint_without_them(tmp_path, dsk_cli):
    recipe = write_recipe(tmp_path)
    with_ema, without = tmp_path / "ema", tmp_path / "plain"
    common = ("--set", "trainer.steps=3", "--set", "trainer.eval_samples=0", "--set", "checkpoint.every=0")
    result = dsk_cli(["train", str(recipe), "--run-dir", str(with_ema), *common, "--set", "features.ema.decay=0.5"])
    assert result.exit_code == 0, result.output
    result = dsk_cli(["train", str(recipe), "--run-dir", str(without), *common])
    assert result.exit_code == 0, result.output
    ckpt = str(latest_checkpoint(with_ema))
    args = ["--prompt", "12+7=", "--max-new-tokens", "6", "--temperature", "0", "--json"]
    trained = json.loads(dsk_cli(["generate", ckpt, *args]).stdout)
    ema = dsk_cli(["generate", ckpt, *args, "--ema"])
    assert ema.exit_code == 0, ema.output
    assert json.loads(ema.stdout)["completions"][0]["tokens"] != trained["completions"][0]["tokens"]
    result = dsk_cli(["eval", str(with_ema), "--ema", "--samples", "2", "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == "ema"
    for args in (["eval", str(without), "--ema", "--samples", "2"],
                 ["generate", str(latest_checkpoint(without)), "--prompt", "1", "--ema"]):  # fmt: skip
        result = dsk_cli(args)
        assert result.exit_code == 2, result.output
        assert "holds no ema weights" in result.output and "Traceback" not in result.output


STAGES = (
    TINY_RECIPE.replace("steps = 12", "steps = 3")
    + """
[features.ema]
decay = 0.5

[[stages]]
name = "first"

[[stages]]
name = "second"
[stages.trainer]
type = "pretrain"
steps = 1
batch_size = 8
seq_len = 40
eval_samples = 0
"""
)


def test_each_stage_starts_its_own_ema_from_its_initial_weights(tmp_path, dsk_cli):
    recipe = write_recipe(tmp_path, STAGES, "stages.toml")
    run_dir = tmp_path / "run"
    result = dsk_cli(["train", str(recipe), "--run-dir", str(run_dir), "--set", "trainer.eval_samples=0"])
    assert result.exit_code == 0, result.output
    first = load_checkpoint(run_dir / "stages" / "first")
    second = load_checkpoint(run_dir / "stages" / "second")
    assert first.feature_state["ema"]["updates"] == 3 and second.feature_state["ema"]["updates"] == 1
    # stage two: one update from its initial weights (stage one's final ones): 0.5 * initial + 0.5 * after step 1
    ema = second.feature_state["ema"]
    for key in (k for k in ema if k.startswith("weights/")):
        name = key.removeprefix("weights/")
        expected = 0.5 * first.model_state[name].double() + 0.5 * second.model_state[name].double()
        torch.testing.assert_close(ema[key].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("features.ema.decay=1.5", "features.ema.decay"),
        ("features.ema.update_every=0", "features.ema.update_every"),
        ("features.offload.pin=true", "features.offload.pin"),
        ("optimizer.betas=[0.9, 1.0]", "optimizer"),
    ],
)
def test_bad_options_are_recipe_errors_with_the_key_path(tmp_path, dsk_cli, setting, key):
    recipe = write_recipe(tmp_path)
    result = dsk_cli(["recipe", "validate", str(recipe), "--set", "optimizer.type=adamw_bf16", "--set", setting])
    assert result.exit_code == 2, result.output
    assert key in result.output and "Traceback" not in result.output
