"""Node-limited expert parallelism on 2 and 4 gloo ranks against the single-process MoE given all ranks' tokens.

One spawn per rank count (each returns every check's numbers; the tests assert on them):

* layer: outputs, input grads, gate / shared-expert grads (summed over ranks) and expert grads (the shards, summed
  over their replicas where ep < world) equal one process's, 1e-6 relative, FP32; every token reaches at most
  ``max_nodes`` nodes, once per node (the rows sent equal the distinct destination nodes), and sends at most
  ``max_nodes x dim x 4`` activation bytes across nodes.
* training: several AdamW steps with the loss convention, gradient sync, global-norm clipping and router bias
  updates give the one-process parameters, biases identical on every rank and equal to one process's.
* checkpoints: the gathered model and optimizer states are the one-process ones (full [E, ...] tensors); loaded
  into a fresh sharded model they round-trip and the next step is the same.
* errors: a router whose groups are not the nodes / whose topk_groups is not max_nodes is refused, naming the keys.

Layouts: 2 ranks (ep 2, two nodes of one rank); 4 ranks as 4 nodes, as 2 nodes x 2 ranks per node (the intra-node
hop), and ep 2 with two replicas of each shard (training: 2 ranks, and 4 ranks with replicas). ``_fp8`` layouts send
the rows as E4M3 with 1 x 8 scales: the reference then feeds the routed experts the same FP8 round trip.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from dsk_moe.config import MoEConfig, NoauxTCConfig
from dsk_moe.moe import MoE
from dsk_moe.router import NoauxTCRouter
from dsk_parallel.expert_config import NodeLimitedConfig, node_limit_problems
from dsk_parallel.expert_validate import node_limited_problems

from dsk.api import SHARDED_PARAM, ModelContext, ResolvedSlot
from tests.distributed.harness import GROUP, run_ranks

pytestmark = pytest.mark.xdist_group(GROUP)

DIM, HIDDEN, B, T = 16, 8, 2, 5  # B sequences of T tokens per rank

FP8_BLOCK = 8  # 1 x 8 tiles: two scales per 16-wide row
# (world, ep, ranks_per_node, n_experts, top_k, n_groups, topk_groups, dispatch); "_fp8": the FP8 dispatch
LAYOUTS = {
    "2r_fp8": (2, 2, 1, 8, 2, 2, 1, "auto"),
    "2x2_fp8": (4, 4, 2, 8, 3, 2, 1, "auto"),
    "2r": (2, 2, 1, 8, 2, 2, 1, "auto"),
    "2r_slices": (2, 2, 1, 8, 2, 2, 1, "loop_slices"),
    "4nodes": (4, 4, 1, 8, 3, 4, 2, "auto"),
    "2x2": (4, 4, 2, 8, 3, 2, 1, "auto"),
    "ep2_rep2": (4, 2, 1, 8, 2, 2, 1, "auto"),
}


def make_moe(n_experts, top_k, n_groups, topk_groups, dispatch="auto", seed=0):
    router = NoauxTCConfig(
        top_k=top_k, n_groups=n_groups, topk_groups=topk_groups, route_scale=2.5, seq_aux_alpha=1e-2,
        bias_update_speed=1e-2,
    )  # fmt: skip
    cfg = MoEConfig(
        n_routed_experts=n_experts, n_shared_experts=1, expert_hidden_dim=HIDDEN, dispatch=dispatch,
        router=ResolvedSlot(kind="router", name="noaux_tc", config=router, impl=NoauxTCRouter),
    )  # fmt: skip
    torch.manual_seed(seed)
    moe = MoE(cfg, ModelContext(dim=DIM, n_layers=1, vocab_size=16, max_seq_len=16, init_std=0.5))
    moe.gate.e_score_correction_bias.copy_(torch.randn(n_experts) * 0.1)
    return moe


class Tiny(torch.nn.Module):
    """A dense projection, then the MoE layer: dense and expert parameters, as in the real model."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.proj = torch.nn.Linear(DIM, DIM)
        self.ffn = moe

    def forward(self, x):
        return self.ffn(self.proj(x))


def strategy(ep, ranks_per_node, max_nodes=None, other_parallel=(), fp8=False):
    from dsk_parallel.expert import NodeLimitedExperts

    from dsk.api.runtime import RunContext

    cfg = NodeLimitedConfig(
        ep=ep, ranks_per_node=ranks_per_node, max_nodes=max_nodes, fp8_dispatch=fp8, fp8_block=FP8_BLOCK
    )
    s = NodeLimitedExperts(cfg)
    s.name = "expert"
    sections = {"parallel": {"expert": None, **{k: None for k in other_parallel}}}
    ctx = RunContext(run_dir=Path(tempfile.gettempdir()), sections=sections, registry=None, pm=None, metrics=None,
                     reporter=None)  # fmt: skip
    s.setup(ctx)
    return s


def rel(a, b):
    """||a - b|| / ||b|| (0 for two zero tensors)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def fp8_reference(moe, x_BTD):
    """One process, the obvious per-expert loop, the routed experts fed the FP8 round trip of their tokens
    (straight-through gradient), the router and the shared experts the tokens themselves."""
    import torch.nn.functional as F
    from dsk_parallel.expert import dequantize_rows, quantize_rows

    Bx, Tx, D = x_BTD.shape
    x = x_BTD.reshape(Bx * Tx, D)
    weights, idx, _ = moe.gate(x, seq_shape=(Bx, Tx))
    xq = x + (dequantize_rows(*quantize_rows(x, FP8_BLOCK), x.dtype) - x).detach()
    y = moe.shared_experts(x)
    ex = moe.experts
    for e in range(ex.n_experts):
        tok, slot = torch.where(idx == e)
        h = F.linear(F.silu(F.linear(xq[tok], ex.w_gate[e])) * F.linear(xq[tok], ex.w_up[e]), ex.w_down[e])
        y = y.index_add(0, tok, h * weights[tok, slot, None])
    return y.view(Bx, Tx, D)


def tokens(world, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * B, T, DIM, generator=g)
    c = torch.randn(world * B, T, DIM, generator=g)
    return x, c


# -- the MoE layer ----------------------------------------------------------------------------------------------


def _layer(rank, world, layout):
    import torch.distributed as dist

    _, ep, rpn, E, K, G, M, dispatch = LAYOUTS[layout]
    fp8 = layout.endswith("_fp8")
    ref = make_moe(E, K, G, M, dispatch)
    moe = copy.deepcopy(ref)
    s = strategy(ep, rpn, fp8=fp8)
    s.wrap_model(moe, None)
    disp = s.dispatchers[0]
    disp.record = True
    x_all, c_all = tokens(world)
    rows = slice(rank * B, (rank + 1) * B)

    x = x_all[rows].clone().requires_grad_(True)
    y = moe(x)
    (y * c_all[rows]).sum().backward()

    xr = x_all.clone().requires_grad_(True)
    yr = fp8_reference(ref, xr) if fp8 else ref(xr)
    (yr * c_all).sum().backward()

    out = {"y": rel(y, yr[rows]), "x_grad": rel(x.grad, xr.grad[rows])}
    for name in ("gate.weight", "shared_experts.gate_proj.weight", "shared_experts.down_proj.weight"):
        g = moe.get_parameter(name).grad.clone()
        dist.all_reduce(g)
        out[name] = rel(g, ref.get_parameter(name).grad)
    start, stop = moe.expert_range
    for name in moe.expert_parameter_names():
        g = moe.get_parameter(name).grad.clone()
        if world > ep:
            dist.all_reduce(g, group=s.replica_group)
        out[name] = rel(g, ref.get_parameter(name).grad[start:stop])
    out["sharded"] = all(getattr(moe.get_parameter(n), SHARDED_PARAM, False) for n in moe.expert_parameter_names())
    out["local_experts"] = (stop - start, moe.experts.n_experts, E // ep)

    # the node limit, checked against the routing itself (node of expert e = e // (E / nodes))
    with torch.no_grad():
        _, idx, _ = ref.gate(x_all[rows].reshape(-1, DIM))
    nodes = ep // rpn
    node_NK = idx // (E // nodes)
    distinct_N = torch.tensor([len(set(r)) for r in node_NK.tolist()])
    own = rank % ep // rpn
    elsewhere_N = distinct_N - (node_NK == own).any(1).long()
    last = disp.last
    out["max_dest_nodes"] = int(last["dest_nodes_N"].max())
    out["dest_nodes_match"] = bool(torch.equal(last["dest_nodes_N"], distinct_N))
    out["inter_rows_sent"] = last["inter_act_bytes"] // last["row_act_bytes"]
    out["inter_rows_expected"] = int(elsewhere_N.sum())
    out["max_token_inter_bytes"] = int(last["inter_rows_N"].max()) * last["row_act_bytes"]
    out["row_act_bytes"] = last["row_act_bytes"]
    out["max_nodes"] = M
    out["slots_in"] = last["slots_in"]
    out["intra_rows"] = last["intra_rows"]
    return out


def _check_layer(result, layout):
    world, ep, rpn, E, K, G, M, _ = LAYOUTS[layout]
    slots = 0
    for r in result:
        for key in (
            "y",
            "x_grad",
            "gate.weight",
            "shared_experts.gate_proj.weight",
            "experts.w_gate",
            "experts.w_down",
        ):
            assert r[key] < 1e-6, (layout, key, r[key])
        assert r["sharded"] and r["local_experts"] == (E // ep,) * 3
        assert r["max_dest_nodes"] <= M and r["dest_nodes_match"], r
        assert r["inter_rows_sent"] == r["inter_rows_expected"]  # once per destination node, not once per expert
        assert r["max_token_inter_bytes"] <= M * DIM * 4
        if layout.endswith("_fp8"):  # E4M3 codes and one float32 scale per tile, not float32 rows
            assert r["row_act_bytes"] == DIM + 4 * DIM // FP8_BLOCK < DIM * 4
            assert r["max_token_inter_bytes"] <= M * r["row_act_bytes"]
        slots += r["slots_in"]
    assert slots == world * B * T * K  # every (token, expert) slot ran exactly once, on some rank
    if rpn > 1:
        assert sum(r["intra_rows"] for r in result) > 0  # the second hop forwarded rows inside the nodes


# -- training steps with bias updates, checkpoints ----------------------------------------------------------------


def _optimizer(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for _, p in named], "names": [n for n, _ in named]}], lr=3e-2)


def _step(model, opt, x, target, s, world, n_global):
    """One step with the trainers' loss convention: weight n_local * W / n_global, gradients the rank mean."""
    opt.zero_grad(set_to_none=True)
    y = model(x)
    per_token = ((y - target) ** 2).sum(-1)
    loss = per_token.sum() / n_global * world + model.ffn.aux_loss()
    loss.backward()
    if s is not None:
        s.sync_gradients(model)
        norm = s.clip_grad_norm([p for p in model.parameters() if p.requires_grad], 0.5)
        s.reduce_step_statistics(model.ffn.step_stat_tensors())
    else:
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.5)
    opt.step()
    model.ffn.after_optimizer_step()
    return float(norm)


def _training(rank, world, layout, steps=4):
    import torch.distributed as dist

    from dsk.train.optim import optimizer_state_to_tensors

    _, ep, rpn, E, K, G, M, dispatch = LAYOUTS[layout]
    torch.manual_seed(0)
    ref = Tiny(make_moe(E, K, G, M, dispatch))
    model = copy.deepcopy(ref)
    s = strategy(ep, rpn)
    s.wrap_model(model, None)
    opt, ref_opt = _optimizer(model), _optimizer(ref)
    bias0 = model.ffn.gate.e_score_correction_bias.clone()
    out = {"norm": [], "ref_norm": []}
    for step in range(steps):
        x_all, target = tokens(world, seed=10 + step)
        rows = slice(rank * B, (rank + 1) * B)
        out["norm"].append(_step(model, opt, x_all[rows], target[rows], s, world, x_all.shape[0] * T))
        out["ref_norm"].append(_step(ref, ref_opt, x_all, target, None, 1, x_all.shape[0] * T))
    bias = model.ffn.gate.e_score_correction_bias.clone()
    biases = [torch.empty_like(bias) for _ in range(world)]
    dist.all_gather(biases, bias)
    out["bias_same_on_ranks"] = all(torch.equal(b, biases[0]) for b in biases)
    out["bias_equals_one_process"] = torch.equal(bias, ref.ffn.gate.e_score_correction_bias)
    out["bias_moved"] = not torch.equal(bias, bias0)

    # checkpoint: the gathered state is one process's state, names and shapes included
    state = s.model_state_dict(model)
    ref_state = ref.state_dict()
    out["state_names"] = sorted(state) == sorted(ref_state)
    out["state_shapes"] = all(tuple(state[k].shape) == tuple(v.shape) for k, v in ref_state.items())
    out["state_err"] = max(rel(state[k], v) for k, v in ref_state.items() if v.is_floating_point() and v.norm() > 0)
    tensors, meta = s.optimizer_state_dict(opt, model)
    ref_tensors, _ = optimizer_state_to_tensors(ref_opt)
    out["opt_names"] = sorted(tensors) == sorted(ref_tensors)
    out["opt_err"] = max(rel(tensors[k], v) for k, v in ref_tensors.items() if v.dim() > 0)

    # round trip into a fresh sharded model and optimizer, then one more step on both
    torch.manual_seed(123)
    fresh = Tiny(make_moe(E, K, G, M, dispatch, seed=123))
    s2 = strategy(ep, rpn)
    s2.wrap_model(fresh, None)
    fresh_opt = _optimizer(fresh)
    s2.load_model_state_dict(fresh, state, "test checkpoint")
    s2.load_optimizer_state_dict(fresh_opt, fresh, tensors, meta, "test checkpoint")
    fresh.ffn.gate.e_score_correction_bias.copy_(state["ffn.gate.e_score_correction_bias"])
    again = s2.model_state_dict(fresh)
    out["round_trip"] = all(torch.equal(again[k], v) for k, v in state.items())
    from dsk.api.runtime import RunSetupError

    bad = {**state, "ffn.experts.w_up": state["ffn.experts.w_up"][: E // 2]}  # a checkpoint of another layer size
    try:
        s2.load_model_state_dict(fresh, bad, "bad checkpoint")
        out["bad_refused"] = False
    except RunSetupError as exc:
        out["bad_refused"] = "bad checkpoint" in str(exc) and "ffn.experts.w_up" in str(exc)
    x_all, target = tokens(world, seed=99)
    rows = slice(rank * B, (rank + 1) * B)
    _step(model, opt, x_all[rows], target[rows], s, world, x_all.shape[0] * T)
    _step(fresh, fresh_opt, x_all[rows], target[rows], s2, world, x_all.shape[0] * T)
    out["next_step_same"] = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    return out


def _check_training(result):
    for r in result:
        assert r["bias_same_on_ranks"] and r["bias_equals_one_process"] and r["bias_moved"], r
        for n, n_ref in zip(r["norm"], r["ref_norm"], strict=True):
            assert abs(n - n_ref) <= 1e-5 * n_ref, (n, n_ref)
        assert r["state_names"] and r["state_shapes"]
        assert r["state_err"] < 1e-5, r["state_err"]
        assert r["opt_names"] and r["opt_err"] < 1e-5, r["opt_err"]
        assert r["round_trip"] and r["next_step_same"] and r["bad_refused"]


# -- mismatches -----------------------------------------------------------------------------------------------


def _errors(rank, world):
    from dsk.api.runtime import RunSetupError

    messages = []
    for (E, K, G, M), max_nodes in [((8, 2, 4, 1), None), ((8, 2, 2, 1), 2), ((8, 2, 1, 1), None)]:
        s = strategy(None, 1, max_nodes=max_nodes)
        try:
            s.wrap_model(make_moe(E, K, G, M), None)
            messages.append(None)
        except RunSetupError as exc:
            messages.append(str(exc))
    return messages


def _composed(rank, world):
    """With another [parallel.*] table (a data strategy owns the dense parameters), sync_gradients touches only the
    expert shards; alone, it averages the dense gradients too."""
    out = {}
    for others in ((), ("data",)):
        model = Tiny(make_moe(8, 2, 2, 1))
        s = strategy(None, 1, other_parallel=others)
        s.wrap_model(model, None)
        for p in model.parameters():
            p.grad = torch.full_like(p, float(rank + 1))
        s.sync_gradients(model)
        out[others] = {
            "dense": float(model.proj.weight.grad.mean()),
            "expert": float(model.ffn.experts.w_gate.grad.mean()),
        }
    return out


def _empty_rank(rank, world):
    """A forward where rank 1 has no tokens (an evaluation batch that does not fill every rank): rank 0's routed
    output is still one process's, in both dispatch formats, and nobody hangs."""
    out = {}
    for fp8 in (False, True):
        ref = make_moe(8, 2, 2, 1).eval()
        moe = copy.deepcopy(ref)
        s = strategy(None, 1, fp8=fp8)
        s.wrap_model(moe, None)
        x = tokens(world)[0][:1].clone() if rank == 0 else torch.zeros(0, T, DIM)
        with torch.no_grad():
            y = moe(x) if rank == 0 else None
            if rank == 1:  # the router and the shared experts on no tokens: only the dispatch takes part
                flat = x.reshape(0, DIM)
                y = s.dispatchers[0](flat, flat.new_zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), moe.local_experts)
            y_ref = (fp8_reference(ref, x) if fp8 else ref(x)) if rank == 0 else y
        out[fp8] = (tuple(y.shape), rel(y, y_ref) if rank == 0 else 0.0)
    return out


def _deepcopied(rank, world):
    """A deep copy of a sharded layer (GRPO's reference policy) dispatches over the same groups, to the same output."""
    moe = make_moe(8, 2, 2, 1)
    s = strategy(None, 1)
    s.wrap_model(moe, None)
    twin = copy.deepcopy(moe)
    x = tokens(world)[0][rank : rank + 1]
    with torch.no_grad():
        return twin.dispatcher is not moe.dispatcher and torch.equal(twin(x), moe(x))


# -- the spawns (one per rank count) ------------------------------------------------------------------------------


def _two_ranks(rank, world):
    return {
        "layer": {k: _layer(rank, world, k) for k in ("2r", "2r_slices", "2r_fp8")},
        "training": _training(rank, world, "2r"),
        "errors": _errors(rank, world),
        "composed": _composed(rank, world),
        "empty": _empty_rank(rank, world),
        "deepcopy": _deepcopied(rank, world),
    }


def _four_ranks(rank, world):
    return {
        "layer": {k: _layer(rank, world, k) for k in ("4nodes", "2x2", "ep2_rep2", "2x2_fp8")},
        "training": _training(rank, world, "ep2_rep2", steps=2),
    }


@pytest.fixture(scope="session")  # once per test process: xdist may interleave other modules
def two():
    return run_ranks(_two_ranks, 2)


@pytest.fixture(scope="session")  # once per test process: xdist may interleave other modules
def four():
    return run_ranks(_four_ranks, 4)


@pytest.mark.parametrize("layout", ["2r", "2r_slices", "2r_fp8"])
def test_layer_on_2_ranks_equals_one_process(two, layout):
    _check_layer([r["layer"][layout] for r in two], layout)


@pytest.mark.parametrize("layout", ["4nodes", "2x2", "ep2_rep2", "2x2_fp8"])
def test_layer_on_4_ranks_equals_one_process(four, layout):
    _check_layer([r["layer"][layout] for r in four], layout)


def test_training_steps_biases_and_checkpoints_on_2_ranks(two):
    _check_training([r["training"] for r in two])


def test_training_steps_biases_and_checkpoints_on_4_ranks_with_replicated_shards(four):
    _check_training([r["training"] for r in four])


def test_router_mismatch_is_refused_naming_the_keys(two):
    groups, max_nodes, no_groups = two[0]["errors"]
    assert "model.ffn.router.n_groups = 4" in groups and "ep / ranks_per_node = 2 / 1 = 2" in groups
    assert "parallel.expert.max_nodes = 2" in max_nodes and "model.ffn.router.topk_groups = 1" in max_nodes
    assert "model.ffn.router.n_groups = 1" in no_groups  # no group limit, but max_nodes (1) < 2 nodes


def test_dense_gradients_are_left_to_another_data_strategy(two):
    for rank, r in enumerate(two):  # every gradient was rank + 1
        alone, composed = r["composed"][()], r["composed"][("data",)]
        assert alone == {"dense": 1.5, "expert": (rank + 1) / 2}  # dense: the rank mean; a shard's: divided by W
        assert composed == {"dense": rank + 1.0, "expert": (rank + 1) / 2}


def test_a_rank_without_tokens_takes_part(two):
    for fp8 in (False, True):
        (shape0, err0), (shape1, _) = two[0]["empty"][fp8], two[1]["empty"][fp8]
        assert shape0 == (1, T, DIM) and err0 < 1e-6 and shape1 == (0, DIM)


def test_a_deep_copy_of_the_sharded_model_runs(two):
    assert all(r["deepcopy"] for r in two)


# -- one process: the config and the recipe check ---------------------------------------------------------------


def test_config_rejects_a_layout_that_cannot_hold():
    with pytest.raises(ValueError, match="ranks_per_node = 3 must divide ep = 4"):
        NodeLimitedConfig(ep=4, ranks_per_node=3)
    with pytest.raises(ValueError, match="max_nodes = 3: must be <= .* = 2"):
        NodeLimitedConfig(ep=4, ranks_per_node=2, max_nodes=3)


def test_fp8_rows_are_the_fp8_features_quantisation():
    from dsk_fp8.quant import quantize
    from dsk_parallel.expert import dequantize_rows, quantize_rows

    x = torch.randn(7, 32, dtype=torch.float64) * torch.logspace(-3, 2, 32)
    x[2] = 0.0  # an all-zero tile takes the amax floor
    codes, scale = quantize_rows(x, 8)
    ref = quantize(x, (1, 8))
    assert torch.equal(codes, ref.data.view(torch.uint8)) and torch.equal(scale, ref.scale)
    back = dequantize_rows(codes, scale, torch.float64)
    assert back.dtype == torch.float64 and float(((back - x).abs() / x.abs().clamp_min(1e-30)).max()) < 2**-4
    none = quantize_rows(x[:0], 8)  # a rank that receives no rows
    assert dequantize_rows(*none, torch.float32).shape == (0, 32)


def test_node_limit_rule():
    assert node_limit_problems("e", 8, 2, None, 4, 2, 16) == []  # 4 nodes = 4 groups, topk_groups = max_nodes
    assert node_limit_problems("e", 2, 1, 2, 1, 1, 8) == []  # no groups and no limit asked for
    assert [p for p, _ in node_limit_problems("e", 3, 1, 1, 2, 1, 8)] == ["parallel.e.ep", "model.ffn.router.n_groups"]


def test_recipe_validation_reports_the_mismatch():
    from dsk.recipe import load_recipe, validate_recipe
    from dsk.testing import builtin_registry

    root = Path(__file__).resolve().parents[4]
    sets = ['parallel.expert.type="node_limited"']

    def problems(*extra):
        recipe = load_recipe(root / "recipes" / "quickstart.toml", sets=[*sets, *extra])
        result = validate_recipe(recipe, builtin_registry())
        assert not result.problems, result.problems
        return [(p.path, p.message) for p in node_limited_problems(result.resolved)]

    assert problems() == []  # the lead's 2-rank quickstart: ep = world, 2 nodes = n_groups, max_nodes = 1
    assert problems("parallel.expert.ep=2") == []
    assert [p for p, _ in problems("parallel.expert.ep=4")] == ["model.ffn.router.n_groups"]
    assert [p for p, _ in problems("parallel.expert.max_nodes=2")] == ["parallel.expert.max_nodes"]
    assert [p for p, _ in problems("parallel.expert.ep=3")] == ["parallel.expert.ep", "model.ffn.router.n_groups"]
    assert [p for p, _ in problems("parallel.expert.fp8_dispatch=true")] == ["parallel.expert.fp8_block"]  # dim 64
    assert problems("parallel.expert.fp8_dispatch=true", "parallel.expert.fp8_block=32") == []


def test_the_hook_reports_through_recipe_validation():
    """Registered as a validate_recipe hook (plugin.py imports it), the check runs with the other recipe checks."""
    import dsk_parallel.expert_validate as hook_module

    from dsk.recipe import load_recipe, validate_recipe
    from dsk.testing import builtin_registry, isolated_plugin_manager

    root = Path(__file__).resolve().parents[4]
    recipe = load_recipe(
        root / "recipes" / "quickstart.toml", sets=['parallel.expert.type="node_limited"', "parallel.expert.ep=4"]
    )
    result = validate_recipe(recipe, builtin_registry(), isolated_plugin_manager(hook_module))
    assert {p.path for p in result.problems} == {"model.ffn.router.n_groups"}
    assert "ep / ranks_per_node = 4 / 1 = 4" in result.problems[0].message
