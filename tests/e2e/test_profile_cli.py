"""``dsk profile`` end to end (in-process): the quickstart recipe measured, its numbers checked against their
references (the router's own MaxVio, the token counts behind the expert loads, torch's FLOP counter, the analytic
KV cache), the trace and plots it writes, two recipes side by side, and bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from dsk import hookimpl
from dsk.testing import isolated_plugin_manager, run_dsk

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
QUICK = ("--set", "trainer.batch_size=16", "--set", "trainer.cpu_threads=1")
WARMUP, STEPS = 2, 3


class RowsSeen:
    """Keeps the metrics rows of the run (what dsk train reports for the same steps)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @hookimpl
    def on_step_end(self, ctx, step, metrics):
        self.rows.append(dict(metrics))


def profile(tmp_path: Path, *args, plugin=None):
    pm = isolated_plugin_manager(plugin) if plugin is not None else isolated_plugin_manager()
    return run_dsk(["profile", *map(str, args), "--out", str(tmp_path / "out"), "--json"], pm=pm)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profile")
    seen = RowsSeen()
    result = profile(tmp, RECIPES / "quickstart.toml", *QUICK, "--warmup", WARMUP, "--steps", STEPS, plugin=seen)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), seen.rows, tmp / "out"


def test_the_report_names_what_it_holds(quickstart):
    report, rows, _ = quickstart
    for key in ("tokens_per_s", "step_s", "mfu", "peak_flops", "flops_per_token", "components_s_per_step",
                "memory", "expert_load", "maxvio", "profiler_overhead"):  # fmt: skip
        assert key in report, key
    assert len(rows) == WARMUP + 2 * STEPS  # the run trained warm-up + measured + profiled steps
    measured = rows[WARMUP : WARMUP + STEPS]
    assert report["step_s"] == pytest.approx(sum(r["step_s"] for r in measured) / STEPS)
    assert report["tokens_per_s"] == pytest.approx(
        sum(r["tokens"] for r in measured) / sum(r["step_s"] for r in measured)
    )
    assert report["mfu"] == pytest.approx(report["flops_per_token"] * report["tokens_per_s"] / report["peak_flops"])
    assert 0 < report["mfu"] < 1


def test_component_times_cover_the_model_parts_and_add_up_to_the_profiled_window(quickstart):
    report, rows, _ = quickstart
    parts = report["components_s_per_step"]
    for name in ("attention", "dense_ffn", "router", "routed_experts", "shared_experts", "mtp", "loss", "optimizer"):
        assert name in report["components_raw_s_per_step"], name
    # the raw parts fill the profiled window exactly, which holds the profiled steps (and the loop between them)
    profiled = rows[WARMUP + STEPS :]
    raw_sum = sum(report["components_raw_s_per_step"].values())
    assert raw_sum >= sum(r["step_s"] for r in profiled) / STEPS * 0.999
    # the corrected parts: the raw ones less the profiler's cost per recorded op, never negative
    for name, seconds in parts.items():
        assert 0 <= seconds <= report["components_raw_s_per_step"][name] + 1e-12
    assert report["components_sum_s"] == pytest.approx(sum(parts.values()))


def test_maxvio_is_the_routers_own_statistic_and_loads_count_every_routed_token(quickstart):
    report, rows, _ = quickstart
    measured = rows[WARMUP : WARMUP + STEPS]
    for layer in ("layers.1", "layers.2"):
        own = [r[f"moe/layer{layer.split('.')[1]}/maxvio"] for r in measured]
        assert report["maxvio"][layer] == pytest.approx(sum(own) / len(own), rel=1e-12)
    # every position of a measured step's forward (padding included) goes to top_k experts of every MoE layer
    top_k = 2
    positions = report["positions_per_step"] * STEPS
    assert positions >= sum(r["tokens"] for r in measured)
    for layer in ("layers.1", "layers.2"):
        assert sum(report["expert_load"][layer]) == positions * top_k
        assert len(report["expert_load"][layer]) == 8


def test_memory_and_kv_cache_against_the_tensors_and_the_analytic_cost(quickstart):
    report, _, _ = quickstart
    m = report["memory"]
    assert m["params_bytes"] == report["params_total"] * 4  # float32 parameters
    assert m["grads_bytes"] == m["params_bytes"]
    assert m["optimizer_state_bytes"] >= 2 * m["params_bytes"]  # AdamW's two moments (and its step counters)
    assert m["kv_cache_bytes_per_token"] == m["kv_cache_bytes_per_token_analytic"]
    # the C++ kernels keep less than the PyTorch path the analytic bytes describe (checked on that path below)
    assert 0 < m["saved_activation_bytes"] < m["saved_activation_bytes_analytic"]


def test_analytic_flops_agree_with_torchs_counter_on_the_plain_dispatch(tmp_path, monkeypatch):
    """With the C++ kernels off and the routed experts as plain GEMMs, torch's counter sees every matrix product of a
    whole training step; it counts the attention's score and value products over all T keys where the analytic
    (causal) cost takes T/2, and the backward as 2x the forward, like the analytic count."""
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    result = profile(tmp_path, RECIPES / "quickstart.toml", *QUICK, "--warmup", 2, "--steps", 1,
                     "--set", "model.ffn.dispatch=loop_slices")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    counted = report["flops_per_position_counted"]
    assert counted == pytest.approx(report["flops_per_token"], rel=0.05)
    assert counted > report["flops_per_token"]  # the non-causal count of the attention products
    # the storage a forward leaves alive for its backward against the components' analytic bytes (which include the
    # loss's log-probabilities, computed outside the model's forward)
    m = report["memory"]
    assert m["saved_activation_bytes"] == pytest.approx(m["saved_activation_bytes_analytic"], rel=0.10)


def test_trace_and_plots_are_written_and_valid(quickstart):
    report, _, out = quickstart
    trace = json.loads(Path(report["files"]["trace"]).read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("dsk.part:attention") for n in names)
    assert json.loads((out / "report.json").read_text())["tokens_per_s"] == report["tokens_per_s"]
    pngs = [Path(p) for k, p in report["files"].items() if k.endswith("plot") or "_plot/" in k]
    assert len(pngs) >= 2  # time by component, expert load
    for png in pngs:
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width > 100 and height > 100


def test_two_recipes_side_by_side(tmp_path):
    mha = RECIPES / "ablations" / "attention-mha.toml"
    result = profile(tmp_path, RECIPES / "quickstart.toml", mha, *QUICK, "--warmup", 1, "--steps", 1)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    first, second = payload["recipes"]
    assert (first["label"], second["label"]) == ("quickstart", "attention-mha")
    ratio = payload["ratios"]["attention-mha"]
    assert ratio["tokens_per_s"] == pytest.approx(second["tokens_per_s"] / first["tokens_per_s"])
    assert ratio["kv_cache_bytes_per_token"] == pytest.approx(
        second["memory"]["kv_cache_bytes_per_token"] / first["memory"]["kv_cache_bytes_per_token"]
    )
    assert ratio["kv_cache_bytes_per_token"] > 1  # MLA caches a compressed latent


def test_bad_input_is_exit_2(tmp_path):
    missing = profile(tmp_path, tmp_path / "nope.toml")
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    bad = profile(tmp_path, RECIPES / "quickstart.toml", "--set", "trainer.bacth_size=3")
    assert bad.exit_code == 2 and "trainer.bacth_size" in bad.output
    staged = profile(tmp_path, RECIPES / "r1.toml")
    assert staged.exit_code == 2 and "[[stages]]" in staged.output
