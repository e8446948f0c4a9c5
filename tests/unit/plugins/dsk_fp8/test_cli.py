"""The fp8 feature through the CLI: a few training steps of the quickstart-sized model with [features.fp8]
block_size = 32 record the FP8 GEMM counts in metrics.jsonl and repeat exactly; a bad block size is exit 2."""

from __future__ import annotations

import pytest

from dsk.train.metrics import read_metrics
from tests.e2e.test_reliability import _run

pytestmark = pytest.mark.xdist_group("subprocess-train")

ARGS = [
    "train", "recipes/quickstart.toml", "--set", "features.fp8.block_size=32", "--set", "trainer.steps=3",
    "--set", "trainer.batch_size=8", "--set", "trainer.eval_every=0", "--set", "trainer.eval_samples=2",
    "--set", "checkpoint.every=0",
]  # fmt: skip


def _rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_quickstart_with_fp8_trains_reports_gemm_counts_and_repeats_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run_dir in (a, b):
        done = _run([*ARGS, "--run-dir", run_dir])
        assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(a)
    assert len(rows) == 3
    # 4 attention modules (3 layers + 1 MTP block) x 4 sites, 1 dense FFN x 2, 3 MoE x (2 shared + 2 routed);
    # each site: forward, dgrad, wgrad
    for r in rows:
        assert r["fp8_gemms"] == 3 * (16 + 2 + 6 + 6)
        assert r["fp8_gemms/attention"] == 48 and r["fp8_gemms/routed_experts"] == 18
        assert r["fp8_gemms/shared_experts"] == 18 and r["fp8_gemms/dense_ffn"] == 6
    assert [r["loss"] for r in rows] == [r["loss"] for r in _rows(b)]  # seeded FP8 runs are deterministic


def test_a_block_size_that_does_not_divide_the_model_is_exit_2_on_dry_run(tmp_path):
    done = _run([*ARGS, "--set", "features.fp8.block_size=128", "--dry-run", "--run-dir", tmp_path / "x"])
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "model.attention.kv_lora_rank" in out and "features.fp8.block_size = 128" in out
    assert "Traceback" not in out
