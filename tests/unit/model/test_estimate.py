"""The run estimate (dsk.api.RunEstimate, dsk.train.fit.estimate_run) and the cost shares of the built-in configs.

Checked against: a hand count of a small layout (4 layers, 1F1B at pp 2, EP 2, ZeRO-1 on 4 ranks) typed from the
config sizes; the per-rank parameter bytes that bench/reference/pipeline-cpu.txt measured for the three schedules;
the saved-activation bytes dsk.profile.activations measures on the real quickstart model with and without
[features.recompute]; the spec's bubble formulas; a Monte Carlo of uniform routing for the expected nodes.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from dsk.api import RunEstimate, SharesCost
from dsk.data.tokenizers import load_tokenizer
from dsk.model.build import build_model
from dsk.model.cost import model_cost, part_costs
from dsk.model.loss import collect_side_channels, training_loss
from dsk.profile.activations import saved_activation_bytes
from dsk.recipe import load_recipe, validate_recipe
from dsk.testing import builtin_registry, isolated_plugin_manager
from dsk.train.fit import estimate_run, meta_model, share_configs

RECIPES = Path(__file__).resolve().parents[3] / "recipes"

# the small layout: recipes/dualpipe.toml (tiny DeepSeek-V3: D 64, MLA H 4, q 32, c 32, dn 16, dr 8, dv 16; dense 192;
# MoE 8 experts of 32, 1 shared, top-2 in 2 groups, 1 allowed; 1 MTP depth) cut to 4 layers
SMALL = (
    "model.n_layers=4",
    'parallel.pipeline={type="1f1b", pp=2}',
    'parallel.expert={type="node_limited", ep=2}',
    'parallel.data={type="zero1"}',
    "trainer.batch_size=8",
)


def _resolved(path: Path, *sets: str) -> dict:
    return validate_recipe(
        load_recipe(path, sets=sets), builtin_registry(), isolated_plugin_manager(), check=True
    ).resolved


@pytest.fixture(scope="module")
def small() -> tuple[dict, RunEstimate]:
    resolved = _resolved(RECIPES / "dualpipe.toml", *SMALL)
    return resolved, estimate_run(resolved, 4)


# -- the parts ---------------------------------------------------------------------------------------------------------


def test_parts_are_the_pipeline_parts_in_order_and_sum_to_the_model():
    resolved = _resolved(RECIPES / "dualpipe.toml", "model.n_layers=4")
    model = meta_model(resolved)
    parts = part_costs(model, 40)
    assert [p.name for p in parts] == ["embed_tokens", *(f"layers.{i}" for i in range(4)), "norm", "lm_head", "mtp"]
    cost = model_cost(model, 40, act_bytes=4)
    assert sum(p.params for p in parts) == cost["params_total"] == sum(t.numel() for t in model.parameters())
    for ab in (2, 4):
        total = model_cost(model, 40, act_bytes=ab)["activation_bytes_per_token"]
        assert sum(p.activations.at(ab) for p in parts) == pytest.approx(total)
    experts = sum(m.experts.w_gate.numel() * 3 for m in model.modules() if type(m).__name__ == "MoE")
    assert sum(p.expert_params for p in parts) == experts


def test_every_builtin_share_is_found_and_layouts_share_first(small):
    resolved, _ = small
    keys = [k for k, _ in share_configs(resolved)]
    assert keys[0] == "parallel.pipeline"  # cost_share_phase -1: the data ranks the others read
    assert set(keys) == {"optimizer", "parallel.pipeline", "parallel.expert", "parallel.data"}
    assert all(isinstance(c, SharesCost) for _, c in share_configs(resolved))


# -- per-GPU memory: a hand count --------------------------------------------------------------------------------------


def test_small_layout_memory_matches_a_hand_count(small):
    _, est = small
    V, D = load_tokenizer("char").vocab_size, 64
    H, q, c, dn, dr, dv = 4, 32, 32, 16, 8, 16
    mla = D * q + q + q * H * (dn + dr) + D * (c + dr) + c + c * H * (dn + dv) + H * dv * D
    norms = 2 * D  # a block's two norms
    dense = 3 * D * 192
    router, shared, experts = 8 * D, 3 * D * 32, 8 * 3 * D * 32
    mtp_own = 3 * D + 2 * D * D  # enorm, hnorm, shared_head.norm, eh_proj
    # 1F1B at pp 2: rank 0 runs stage 0 (embedding, layers 0-1), rank 1 stage 1 (layers 2-3, final norm, head, MTP,
    # and the embedding again for MTP); layer 0 is dense; EP 2 halves the experts; ZeRO-1 halves the rest's state
    dense0 = V * D + 2 * (mla + norms) + dense + router + shared
    experts0 = experts
    dense1 = V * D + 2 * (mla + norms + router + shared) + D + V * D + mtp_own + mla + norms + router + shared
    experts1 = 3 * experts
    ranks = est.rank_memory()
    assert [m.parts[:2] for m in ranks] == [["embed_tokens", "layers.0"], ["layers.2", "layers.3"]]
    for m, d, e in zip(ranks, (dense0, dense1), (experts0, experts1), strict=True):
        assert m.params == 4 * (d + e / 2)
        assert m.grads == 4 * (d + e / 2)
        assert m.optimizer == 8 * (d / 2 + e / 2)  # AdamW: two FP32 moments; the slices keep their whole state
        assert m.cpu == 0
    # activations: 8 rows x 40 tokens cut into 2 chunks of 160; rank r holds pp - r chunks of its stage, FP32
    parts = {p.name: p.activations.at(4) for p in est.parts}
    assert ranks[0].activations == pytest.approx(2 * 160 * (parts["layers.0"] + parts["layers.1"]))
    stage1 = sum(parts[n] for n in ("layers.2", "layers.3", "norm", "lm_head", "mtp", "embed_tokens"))
    assert ranks[1].activations == pytest.approx(1 * 160 * stage1)
    assert est.most_loaded().rank == max(ranks, key=lambda m: m.total).rank


@pytest.mark.parametrize(
    ("kind", "params_kib"),
    [("1f1b", (1082.0, 1502.8)), ("dualpipe", (2551.8, 2551.8)), ("dualpipev", (1428.8, 1123.0))],
)
def test_pipeline_ranks_hold_the_parameters_the_benchmark_measured(kind, params_kib):
    """bench/reference/pipeline-cpu.txt, "PP 2 memory per rank": the parameters each rank holds, and gradients plus
    AdamW state 3x them (measured after a step)."""
    est = estimate_run(_resolved(RECIPES / "dualpipe.toml", f'parallel.pipeline={{type="{kind}", pp=2}}'), 2)
    ranks = est.rank_memory()
    assert [round(m.params / 1024, 1) for m in ranks] == list(params_kib)
    assert all(m.grads + m.optimizer == 3 * m.params for m in ranks)


def test_bf16_moments_halve_the_optimizer_state_and_each_optimizer_names_the_other(small):
    _, est = small
    resolved = _resolved(RECIPES / "dualpipe.toml", *SMALL, 'optimizer={type="adamw_bf16"}')
    bf16 = estimate_run(resolved, 4)
    for a, b in zip(est.rank_memory(), bf16.rank_memory(), strict=True):
        assert b.optimizer == a.optimizer / 2 and (b.params, b.grads) == (a.params, a.grads)
    assert est.optimizer_alternatives == {"adamw_bf16": 4.0} and bf16.optimizer_alternatives == {"adamw": 8.0}
    assert est.rank_memory(optimizer_bytes_per_param=4.0)[1].optimizer == bf16.rank_memory()[1].optimizer


@pytest.mark.parametrize(("data", "shards"), [("replicate", (1, 1, 1)), ("zero1", (1, 1, 4)), ("fsdp", (4, 4, 4))])
def test_data_parallel_divisors(data, shards):
    resolved = _resolved(RECIPES / "quickstart.toml", f'parallel.data={{type="{data}"}}')
    est = estimate_run(resolved, 4)
    assert (est.param_shards, est.grad_shards, est.optimizer_shards) == shards
    n = sum(p.params for p in est.parts)  # no expert parallelism: every parameter is data-parallel
    m = est.rank_memory()[0]
    assert (m.params, m.grads, m.optimizer) == (4 * n / shards[0], 4 * n / shards[1], 8 * n / shards[2])


def test_offload_and_ema_move_bytes_to_the_cpu_and_bf16_halves_the_activations():
    base = estimate_run(_resolved(RECIPES / "quickstart.toml"), 1).rank_memory()[0]
    sets = ("features.offload={}", "features.ema={}", "features.bf16={}")
    m = estimate_run(_resolved(RECIPES / "quickstart.toml", *sets), 1).rank_memory()[0]
    n = sum(p.params for p in estimate_run(_resolved(RECIPES / "quickstart.toml"), 1).parts)
    assert (m.params, m.grads, m.optimizer) == (base.params, base.grads, 0.0)
    assert m.cpu == 8 * n + 4 * n + 4 * n  # AdamW state, the FP32 master copy, the EMA
    assert 0.5 * base.activations < m.activations < 0.6 * base.activations  # float32 statistics stay 4 bytes


# -- recomputation against what the forward keeps ----------------------------------------------------------------------


def _measured(resolved: dict, rows: int, seq: int) -> float:
    from dsk_recompute.recompute import apply_recompute

    torch.manual_seed(0)
    model = build_model(resolved["model"], 64).train()
    rc = (resolved.get("features") or {}).get("recompute")
    if rc is not None:
        apply_recompute(model, rc.config.mode, rc.config.recompute_regions())
    side = collect_side_channels(model)
    ids = torch.randint(0, 64, (rows, seq), generator=torch.Generator().manual_seed(1))
    run = lambda: training_loss(model, ids, ids.clone(), side=side).loss  # noqa: E731
    run()  # warm-up: the region handler learns which regions run as their own node
    return saved_activation_bytes(run, model).bytes


def test_recompute_activation_estimate_matches_the_measured_forward(monkeypatch):
    """The quickstart model (FP32, the PyTorch paths that a GPU runs: DSK_CPU_KERNELS=0), 8 rows of 40 tokens.
    Measured about 30200 B per token without recomputation, 21100-21600 selective (the region handler's bytes vary
    by a few percent between processes), 4320 full; the estimate: 29368, 20216, 4624. So: within 5% without
    recomputation, 10% selective (and the bytes it frees, 8600-9100 against 9152), 10% full (the analytic count of
    the parts outside the blocks is ~300 B per token high)."""
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    rows, seq = 8, 40
    got = {}
    for mode in (None, "selective", "full"):
        sets = ("model.vocab_size=64", f"trainer.batch_size={rows}") + (
            (f'features.recompute={{mode="{mode}"}}',) if mode else ()
        )
        resolved = _resolved(RECIPES / "quickstart.toml", *sets)
        est = estimate_run(resolved, 1)
        assert est.recompute == mode
        got[mode] = (est.rank_memory()[0].activations, _measured(resolved, rows, seq))
    for mode, tol in ((None, 0.05), ("selective", 0.10), ("full", 0.10)):
        assert got[mode][0] == pytest.approx(got[mode][1], rel=tol), (mode, got)
    freed = got[None][0] - got["selective"][0], got[None][1] - got["selective"][1]
    assert freed[0] == pytest.approx(freed[1], rel=0.10), got


# -- all-to-all bytes --------------------------------------------------------------------------------------------------


def test_expected_nodes_formula_matches_a_monte_carlo_of_uniform_routing():
    from dsk_parallel.expert_config import expected_nodes

    rng = random.Random(0)
    for E, N, K in ((256, 8, 8), (8, 2, 2), (64, 16, 6)):
        trials = 20000
        mc = sum(len({e // (E // N) for e in rng.sample(range(E), K)}) for _ in range(trials)) / trials
        assert expected_nodes(E, N, K) == pytest.approx(mc, rel=0.01)
    assert expected_nodes(8, 2, 2) == pytest.approx(2 * (1 - math.comb(4, 2) / math.comb(8, 2)))


def test_all_to_all_bytes_with_and_without_the_node_limit(small):
    from dsk_parallel.expert_config import expected_nodes

    _, est = small
    D, ab = 64, 4  # FP32 activations; 2 nodes of 4 experts, top-2, at most 1 node (topk_groups)
    comm = est.comm_bytes_per_token
    assert comm["all_to_all_per_moe_layer"] == 1 * D * (ab + ab)
    assert comm["all_to_all_per_moe_layer_without_node_limit"] == pytest.approx(expected_nodes(8, 2, 2) * D * 2 * ab)
    assert comm["all_to_all_per_moe_layer_without_node_limit_bound"] == 2 * D * 2 * ab
    # 3 MoE layers and the MTP block's; the backward moves the same copies both ways
    assert comm["all_to_all_training"] == 4 * (1 * D * 2 * ab + 2 * 1 * D * ab)
    assert est.expert_shards == 2


def test_fp8_dispatch_sends_a_byte_per_value_and_a_scale_per_tile():
    resolved = _resolved(RECIPES / "deepseek-v3-671b.toml", "parallel.expert.fp8_dispatch=true")
    est = estimate_run(resolved, 2048, model=_V3_MODEL())
    # 4 nodes; dispatch 7168 x (1 + 4 / 128), combine 7168 x 4 (FP32 activations: the recipe has no bf16)
    assert est.comm_bytes_per_token["all_to_all_per_moe_layer"] == pytest.approx(4 * 7168 * (1 + 4 / 128 + 4))
    assert est.details["all_to_all"]["copies"]["without_node_limit"] == pytest.approx(
        8 * (1 - math.comb(224, 8) / math.comb(256, 8))
    )


_V3_CACHE: list = []


def _V3_MODEL():
    if not _V3_CACHE:
        _V3_CACHE.append(meta_model(_resolved(RECIPES / "deepseek-v3-671b.toml")))
    return _V3_CACHE[0]


# -- the pipeline bubble -----------------------------------------------------------------------------------------------


def test_bubble_follows_the_spec_formulas():
    from dsk_parallel.pipeline_config import schedule_bubble

    # F = 1, B = 2, W = 1 per chunk and stage; F&B = F + B
    b = schedule_bubble("1f1b", 4, 8)
    assert (b["idle"], b["busy"]) == (3 * 3, 8 * 3) and b["fraction"] == pytest.approx(9 / 33)
    assert b["fraction"] == pytest.approx((4 - 1) / (8 + 4 - 1))  # the textbook (p - 1) / (m + p - 1)
    b = schedule_bubble("dualpipe", 16, 40)
    assert b["idle"] == (16 / 2 - 1) * (3 + 2 - 3) and b["fraction"] == pytest.approx(14 / (14 + 120))
    assert schedule_bubble("dualpipe", 16, 40, zero_bubble=False)["idle"] == 7 * (3 + 2)
    b = schedule_bubble("dualpipev", 2, 4)  # 4 stages: (4/2 - 1)(F&B + B - 3W); each chunk passes 2 stages
    assert (b["idle"], b["busy"]) == (2, 4 * 3 * 2)


def test_dualpipe_holds_pp_plus_one_chunks_over_its_two_stages():
    est = estimate_run(_resolved(RECIPES / "dualpipe.toml"), 2)
    for layout in est.layouts():
        assert [s.in_flight for s in layout.stages] == [1.5, 1.5]
    assert est.bubble["schedule"] == "dualpipe" and est.chunks == 4
