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


def test_a_layout_the_gpus_cannot_hold_is_exit_2_with_the_reason(pm):
    result = run_dsk(["plan", V3, "--gpus", "2000"], pm=pm)
    assert result.exit_code == 2
    err = " ".join(result.stderr.split())
    assert "parallel.expert.ep = 64 must divide the 125 data-parallel ranks" in err
    assert "Traceback" not in result.output
