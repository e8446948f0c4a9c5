"""``dsk plan``: a full-scale run sized from a recipe without building it (the model on the meta device).

DeepSeek-V3's recipe gives the report's 671B parameters (without the MTP module) and 37B activated (embedding and
head included); the GPU-hours follow from the FLOPs, the GPUs, their peak and the MFU; a reported run's GPU-hours
give the MFU they imply; a layout the GPUs cannot hold is exit 2 with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsk.plugins import make_plugin_manager
from dsk.testing import run_dsk

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
V3 = str(RECIPES / "deepseek-v3-671b.toml")


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager()


def _plan(pm, *args: str) -> dict:
    result = run_dsk(["plan", *args, "--json"], pm=pm)
    assert result.exit_code == 0, result.output[-2000:]
    return json.loads(result.stdout)


def test_deepseek_v3_parameters_and_the_mfu_its_reported_gpu_hours_imply(pm):
    n = _plan(pm, V3, "--gpus", "2048", "--tokens", "14.8e12", "--gpu-hours", "2.664e6")
    assert abs(n["params_without_mtp"] / 671e9 - 1) < 0.01
    assert n["params_total"] > n["params_without_mtp"] > 0
    assert abs(n["active_params_with_embeddings"] / 37e9 - 1) < 0.03
    assert n["seq_len"] == 4096
    flops = n["training_flops_per_token"] * 14.8e12
    assert n["training_flops"] == pytest.approx(flops)
    assert n["implied_mfu"] == pytest.approx(flops / (2.664e6 * 3600 * 989.4e12))
    assert 0.2 < n["implied_mfu"] < 0.6  # a plausible utilisation, not a unit error
    assert n["days"] == pytest.approx(2.664e6 / 2048 / 24)
    assert n["cost_usd"] == pytest.approx(2.664e6 * 2.0)


def test_gpu_hours_follow_from_flops_peak_and_mfu(pm):
    n = _plan(pm, str(RECIPES / "quickstart.toml"), "--gpus", "8", "--tokens", "1e9", "--gpu-peak-tflops", "100",
              "--mfu", "0.5", "--price", "3")  # fmt: skip
    hours = n["training_flops_per_token"] * 1e9 / (0.5 * 100e12) / 3600
    assert n["gpu_hours"] == pytest.approx(hours)
    assert n["days"] == pytest.approx(hours / 8 / 24)
    assert n["cost_usd"] == pytest.approx(3 * hours)
    assert n["training_flops_per_token"] == pytest.approx(3 * n["forward_flops_per_token"])
    # no pipeline and no expert parallelism: one layout for every GPU, no bubble, no all-to-all
    assert n["bubble"] is None and n["all_to_all"] == {} and len(n["memory_per_pipeline_rank"]) == 1
    assert n["memory"]["grads_bytes"] == n["memory"]["params_bytes"] == 4 * n["params_total"]


def test_a_layout_the_gpus_cannot_hold_is_exit_2_with_the_reason(pm):
    result = run_dsk(["plan", V3, "--gpus", "2000"], pm=pm)
    assert result.exit_code == 2
    err = " ".join(result.stderr.split())
    assert "parallel.expert.ep = 64 must divide the 125 data-parallel ranks" in err
    assert "Traceback" not in result.output


def test_deepseek_v3_plan_has_the_memory_all_to_all_and_bubble_of_its_layout(pm):
    n = _plan(pm, V3, "--gpus", "2048")
    m = n["memory"]
    assert m["total_bytes"] == pytest.approx(
        m["params_bytes"] + m["grads_bytes"] + m["optimizer_bytes"] + m["activations_bytes"]
    )
    assert m["grads_bytes"] == m["params_bytes"] > 0  # FP32 parameters and gradients, ZeRO-1 shards neither
    assert m["optimizer_bytes_alternatives"]["adamw_bf16"] == pytest.approx(m["optimizer_bytes"] / 2)
    assert m["recompute"] is None and m["activations_bytes"] == m["activations_bytes_without_recompute"]
    assert m["activations_bytes_full_recompute"] < m["activations_bytes_selective_recompute"] < m["activations_bytes"]
    ranks = n["memory_per_pipeline_rank"]
    assert len(ranks) == 16 and max(r["total_bytes"] for r in ranks) == m["total_bytes"]
    assert n["tokens_per_micro_batch"] == 120 * 4096 and n["chunks"] == 40
    a2a = n["all_to_all"]
    assert a2a["all_to_all_per_moe_layer"] == 4 * 7168 * (4 + 4)  # 4 nodes, FP32 dispatch and combine
    assert a2a["copies"]["without_node_limit_bound"] == 8 and 5 < a2a["copies"]["without_node_limit"] < 6
    assert a2a["moe_layers"] == 58 + 1  # 61 layers, 3 dense, and the MTP block
    assert n["bubble"]["schedule"] == "dualpipe"
    assert n["bubble"]["fraction"] == pytest.approx(14 / (14 + 40 * 3))  # (16/2 - 1)(F&B + B - 3W) at F 1, B 2, W 1


def test_plan_prints_the_memory_rows(pm):
    result = run_dsk(["plan", V3, "--gpus", "2048"], pm=pm)
    assert result.exit_code == 0, result.output[-2000:]
    out = " ".join(result.stdout.split())
    for row in ("optimizer states with adamw_bf16", "activations with full recompute", "without the node limit",
                "pipeline bubble (dualpipe, pp 16, 40 chunks"):  # fmt: skip
        assert row in out


def test_train_refuses_a_run_that_cannot_fit_before_building_it(pm, tmp_path):
    from dsk.recipe import load_recipe, validate_recipe
    from dsk.testing import builtin_registry
    from dsk.train.fit import ACTIVATION_FLOOR, available_memory, estimate_run

    sets = ("model.dim=65536",)
    resolved = validate_recipe(load_recipe(RECIPES / "quickstart.toml", sets=sets), builtin_registry()).resolved
    need = estimate_run(resolved, 1).most_loaded()
    have = available_memory("cpu")
    assert have is not None
    if need.total - (1 - ACTIVATION_FLOOR) * need.activations <= have[0]:
        pytest.skip(f"this machine has {have[0] / 2**30:.0f} GiB: the 162 GiB run would fit and start training")
    run_dir = tmp_path / "run"
    result = run_dsk(["train", str(RECIPES / "quickstart.toml"), "--set", "model.dim=65536", "--run-dir", str(run_dir)],
                     pm=pm)  # fmt: skip
    assert result.exit_code == 2, result.output[-2000:]
    err = " ".join(result.stderr.split())
    assert "the run needs about 162.0 GiB per rank (params 33.0, grads 33.0, optimizer 66.0, activations 30.0)" in err
    assert "GiB available (CPU MemAvailable)" in err
    assert "Traceback" not in result.output and result.exception is None
    assert not (run_dir / "checkpoints").exists() and not list(run_dir.rglob("*.safetensors"))
