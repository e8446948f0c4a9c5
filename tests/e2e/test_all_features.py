"""Every precision and memory feature at once on MLA + MoE (noaux_tc) + MTP, through the CLI (issue 10).

recipes/fp8.toml turns on bf16 + fp8 (block 32) + selective recompute + ema; this test adds the optimizer-state
offload and the BF16-moment AdamW, trains a few steps, and checks what each feature leaves behind: quantised GEMM
counts in the metrics, the EMA and the BF16 moments in the checkpoint, the weights in FP32, and a run that
evaluates with the EMA weights. Bad options of the features are recipe errors with their key paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsk.train.checkpoint import load_checkpoint
from dsk.train.metrics import read_metrics

pytestmark = pytest.mark.xdist_group("subprocess-train")

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "fp8.toml")
SHORT = ("--set", "trainer.steps=4", "--set", "trainer.batch_size=4", "--set", "checkpoint.every=4",
         "--set", "optimizer.warmup_steps=1")  # fmt: skip
MORE = ("--set", "features.offload.enabled=true", "--set", "optimizer.type=adamw_bf16")


def test_every_feature_on_together_trains_and_leaves_each_features_trace(tmp_path, dsk_cli):
    run_dir = tmp_path / "all"
    result = dsk_cli(["train", RECIPE, "--run-dir", str(run_dir), *SHORT, *MORE])
    assert result.exit_code == 0, result.output
    resolved = (run_dir / "resolved.toml").read_text()
    for feature in ("bf16", "fp8", "recompute", "ema", "offload"):
        assert f"[features.{feature}]" in resolved
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # the quantised GEMMs of the step: attention (incl. the concatenated down-projection), the dense FFN, the
    # shared and the routed experts of the main layers and of the MTP block
    assert all(r["fp8_gemms"] > 0 for r in rows)
    for group in ("attention", "dense_ffn", "shared_experts", "routed_experts"):
        assert all(r[f"fp8_gemms/{group}"] > 0 for r in rows), group

    ckpt = load_checkpoint(run_dir)
    assert ckpt.step == 4
    assert all(t.dtype == torch.float32 for t in ckpt.model_state.values() if t.is_floating_point())
    ema = ckpt.feature_state["ema"]
    assert ema["updates"] == 4 and any(k.startswith("weights/") for k in ema)
    moments = [k for k in ckpt.optimizer_tensors if k.endswith(("/exp_avg", "/exp_avg_sq"))]
    assert moments and all(ckpt.optimizer_tensors[k].dtype == torch.bfloat16 for k in moments)

    # the markov task is text without prompts and answers, so the EMA weights are used by generation
    gen = dsk_cli(["generate", str(ckpt.path), "--ema", "--prompt", "ab", "--max-new-tokens", "4", "--json"])
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.output)


@pytest.mark.parametrize(
    ("override", "path", "words"),
    [
        ("features.fp8.block_size=24", "features.fp8.block_size", "power of two"),
        ("features.fp8.block_size=128", "model.dim", "128"),
        ('features.fp8.scaling="rowwise"', "features.fp8.scaling", "blockwise"),
        ('features.recompute.mode="partial"', "features.recompute.mode", "selective"),
        ("features.ema.decay=1.5", "features.ema.decay", "1"),
    ],
)
def test_bad_feature_options_are_recipe_errors_with_the_key_path(override, path, words, dsk_cli):
    result = dsk_cli(["recipe", "validate", RECIPE, "--set", override])
    assert result.exit_code == 2, result.output
    assert path in result.output and words in result.output
    assert "Traceback" not in result.output


def test_turning_fp8_off_leaves_a_valid_bf16_recipe(dsk_cli):
    result = dsk_cli(["recipe", "validate", RECIPE, "--set", "features.fp8.enabled=false"])
    assert result.exit_code == 0, result.output
