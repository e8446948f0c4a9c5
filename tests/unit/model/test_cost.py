"""The analytic cost protocol (dsk.api.Cost / CostModel) and the core's sum (dsk.model.cost.model_cost).

Checked against: the parameter tensors (sum of numel, tied once) for many configs, real and meta-built; hand counts
of a small config; torch's FLOP counter on the tiny model's forward (DSK_CPU_KERNELS=0 and the plain per-expert
dispatch, so that every GEMM goes through an aten op the counter sees); DeepSeek-V3's published sizes.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsk.api import Cost, CostModel
from dsk.model.build import build_model
from dsk.model.cost import model_cost
from dsk.recipe import load_recipe, validate_recipe
from dsk.testing import builtin_registry, isolated_plugin_manager, run_dsk
from tests.unit.model.tiny import TINY, tiny_config

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
V3 = RECIPES / "deepseek-v3-671b.toml"


def _recipe_model_config(path: Path, sets: tuple[str, ...] = ()):
    return validate_recipe(load_recipe(path, sets=sets), builtin_registry(), check=True).resolved["model"]


def _held(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied weight once


# -- the protocol --------------------------------------------------------------------------------------------------


def test_cost_adds_field_by_field_and_components_implement_the_protocol():
    a = Cost(1, 2, 3.0, 4.0, 5.0, 6.0, 7.0)
    b = Cost(10, 20, 30.0, 40.0, 50.0, 60.0, 70.0)
    assert a + b == Cost(11, 22, 33.0, 44.0, 55.0, 66.0, 77.0)
    assert sum([a, b], Cost()) == a + b
    model = build_model(tiny_config())
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, CostModel)}
    assert kinds == {"MLA", "Dense", "MoE", "MTP"}  # the router, experts and shared SwiGLU are the MoE's own parts
    assert not isinstance(model, CostModel)


# -- parameters: exactly the tensors ---------------------------------------------------------------------------------


def _variants() -> list[dict]:
    """Tiny model tables covering each component's options, plus seeded random sizes."""
    out = [
        {},
        {"mtp": None},
        {"tie_embeddings": True},
        {"first_k_dense": 0},
        {"first_k_dense": 3, "mtp": None},
        {"attention": {"type": "mha", "n_heads": 4}},
        {"attention": {"type": "mha", "n_heads": 2, "head_dim": 6}},
        {"attention": {**TINY["attention"], "q_lora_rank": None}},
        {"ffn": {**TINY["ffn"], "n_shared_experts": 0}},
        {"ffn": {**TINY["ffn"], "n_shared_experts": 2, "router": {"type": "aux_loss", "top_k": 3}}},
    ]
    rng = random.Random(0)
    for _ in range(4):
        heads = rng.randint(1, 4)
        experts = rng.choice([2, 4, 6, 8])
        out.append(
            {
                "vocab_size": rng.randint(10, 80),
                "dim": rng.choice([8, 16, 24, 40]),
                "n_layers": rng.randint(1, 4),
                "first_k_dense": 0,
                "tie_embeddings": rng.random() < 0.5,
                "attention": {
                    "type": "mla",
                    "n_heads": heads,
                    "q_lora_rank": rng.choice([None, 8, 12]),
                    "kv_lora_rank": rng.choice([4, 8, 12]),
                    "qk_nope_head_dim": rng.choice([2, 4, 6]),
                    "qk_rope_head_dim": rng.choice([2, 4]),
                    "v_head_dim": rng.choice([2, 4, 10]),
                },
                "dense_ffn": {"type": "dense", "hidden_dim": rng.randint(4, 40)},
                "ffn": {
                    "type": "moe",
                    "n_routed_experts": experts,
                    "n_shared_experts": rng.randint(0, 2),
                    "expert_hidden_dim": rng.randint(2, 20),
                    "router": {"type": "greedy", "top_k": rng.randint(1, experts)},
                },
                "mtp": {"type": "mtp", "depth": rng.randint(1, 3)} if rng.random() < 0.7 else None,
            }
        )
    return out


@pytest.mark.parametrize("overrides", _variants(), ids=lambda o: ",".join(o) or "tiny")
def test_parameter_counts_equal_the_tensors(overrides):
    model = build_model(tiny_config(**overrides))
    cost = model_cost(model, seq_len=16)
    assert cost["params_total"] == _held(model) == model.num_parameters() == cost["params_held"]
    mtp_own = _held(model.mtp) if model.mtp is not None else 0  # the MTP modules hold no embedding or head
    assert cost["params_mtp"] == mtp_own
    assert cost["params_without_mtp"] == _held(model) - mtp_own
    assert cost["params_embeddings"] == model.num_parameters() - model.num_parameters(exclude_embeddings=True)
    assert sum(part["params"] for part in cost["by_component"].values()) == cost["params_total"]
    if model.mtp is None:
        assert "mtp" not in cost["by_component"] and cost["flops_per_token"] == cost["flops_per_token_without_mtp"]


def test_the_tiny_recipe_counts_its_tensors_and_a_meta_build_costs_the_same():
    cfg = _recipe_model_config(RECIPES / "base" / "tiny-dsv3.toml")
    real = model_cost(build_model(cfg, 64), seq_len=40)
    with torch.device("meta"):
        meta_model = build_model(cfg, 64)
    assert meta_model.embed_tokens.weight.is_meta
    assert model_cost(meta_model, seq_len=40) == real
    assert real["params_total"] == _held(meta_model)
    # the recipe's header: 0.28M besides embedding and head, 0.08M of them in the MTP module
    assert round(real["params_total"] - real["params_embeddings"], -4) == 280_000
    assert round(real["params_mtp"], -4) == 80_000


def test_sharded_experts_hold_fewer_parameters_but_cost_a_token_the_same():
    model = build_model(tiny_config(mtp=None))
    moe = model.layers[1].mlp
    before = moe.cost(16)
    moe.shard_experts(0, 1, dispatcher=lambda *a: None)  # 1 of the 4 experts kept (no forward runs)
    after = moe.cost(16)
    assert after.params == _held(moe) == before.params - 3 * 3 * 32 * 16
    assert (after.active_params, after.flops_per_token) == (before.active_params, before.flops_per_token)


# -- FLOPs: hand counts ------------------------------------------------------------------------------------------------


def test_flops_and_active_parameters_match_a_hand_count():
    """``TINY``: D 32, V 48, 3 layers (1 dense), MLA H 2, q 16, c 16, dn 8, dr 4, dv 8; dense 48; MoE E 4 of 16
    wide, 1 shared, top-2; 2 MTP depths; at T = 10."""
    T = 10
    cost = model_cost(build_model(tiny_config()), seq_len=T)
    # MLA multiply-adds: q_a 32*16 + q_b 16*2*12 + kv_a 32*(16+4) + kv_b 16*2*(8+8) + o 2*8*32 = 2560;
    # scores and values: 2 heads * (12 + 8) per key over T/2 = 5 keys
    mla_flops = 2 * 2560 + 2 * 5 * 2 * (12 + 8)
    mla_params = 2560 + 16 + 16  # + q_a_layernorm, kv_a_layernorm
    dense_flops, dense_params = 2 * 3 * 32 * 48, 3 * 32 * 48
    expert = 3 * 32 * 16
    moe_flops = 2 * (4 * 32 + 2 * expert + expert)  # router, top-2 routed, shared
    moe_active, moe_params = 4 * 32 + 3 * expert, 4 * 32 + 5 * expert
    head_flops = 2 * 32 * 48
    mtp_own_flops = 2 * (2 * 32) * 32  # eh_proj 2D -> D
    norms = (3 * 2 + 1) * 32

    bc = cost["by_component"]
    assert bc["attention"]["flops_per_token"] == 3 * mla_flops
    assert bc["attention"]["params"] == 3 * mla_params
    assert bc["dense_ffn"]["flops_per_token"] == dense_flops
    assert bc["ffn"]["flops_per_token"] == 2 * moe_flops
    assert (bc["ffn"]["params"], bc["ffn"]["active_params"]) == (2 * moe_params, 2 * moe_active)
    assert bc["head"]["flops_per_token"] == head_flops and bc["embedding"]["flops_per_token"] == 0
    main = 3 * mla_flops + dense_flops + 2 * moe_flops + head_flops
    mtp = 2 * (mtp_own_flops + mla_flops + moe_flops + head_flops)  # every depth: its block and the shared head
    assert cost["flops_per_token_without_mtp"] == main
    assert cost["flops_per_token"] == main + mtp
    assert cost["training_flops_per_token"] == 3 * (main + mtp)
    assert cost["active_params_without_embeddings"] == 3 * mla_params + dense_params + 2 * moe_active + norms
    assert cost["active_params_with_embeddings"] == cost["active_params_without_embeddings"] + 2 * 48 * 32
    # latent cache: c + dr values per token and layer at 2 bytes
    assert cost["kv_bytes_per_token"] == 3 * (16 + 4) * 2 and cost["kv_bytes_per_token_mtp"] == 2 * (16 + 4) * 2


def test_mha_flops_match_a_hand_count():
    cost = model_cost(build_model(tiny_config(attention={"type": "mha", "n_heads": 2}, mtp=None)), seq_len=10)
    # q, k, v, o: 4 * 32 * 32 multiply-adds; scores and values 2 * (2 heads * 16) per key over 5 keys
    assert cost["by_component"]["attention"]["flops_per_token"] == 3 * (2 * 4 * 32 * 32 + 2 * 5 * 2 * 32)
    assert cost["kv_bytes_per_token"] == 3 * 2 * 32 * 2


# -- FLOPs: torch's counter --------------------------------------------------------------------------------------------


def _counted_flops_per_token(model, ids, **kwargs) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, **kwargs)
    return counter.get_total_flops() / ids.numel()


def _causal_correction(attn, T: int) -> float:
    """What the counter counts beyond the analytic causal average: it counts the score and value products of all
    T keys (SDPA and the small-sequence path both compute the full T x T products), the analytic cost T/2."""
    if type(attn).__name__ == "MLA":
        per_key = attn.n_heads * (attn.qk_head_dim + attn.v_head_dim)
    else:
        per_key = 2 * attn.n_heads * attn.head_dim
    return 2.0 * (T / 2) * per_key


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_flops_agree_with_torch_flop_counter(monkeypatch, attention):
    """The tiny recipe's forward at T = 40: the main model exactly (after the causal correction), and with the MTP
    module within 2% (its depth k runs on T - k of the T positions, which the per-token cost does not discount)."""
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")  # the C++ kernels run GEMMs the counter does not see
    sets = ("model.ffn.dispatch=loop_slices",)  # the counter does not count torch._grouped_mm (torch 2.13)
    if attention == "mha":
        sets += ('model.attention={type="mha", n_heads=4}',)
    torch.manual_seed(0)
    model = build_model(_recipe_model_config(RECIPES / "base" / "tiny-dsv3.toml", sets), 64).eval()
    B, T = 3, 40
    ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))
    cost = model_cost(model, seq_len=T)
    correction = sum(_causal_correction(layer.self_attn, T) for layer in model.layers)
    assert _counted_flops_per_token(model, ids) == pytest.approx(cost["flops_per_token_without_mtp"] + correction)

    counted = _counted_flops_per_token(model, ids, with_mtp=True)
    correction += sum(_causal_correction(layer.block.self_attn, T) for layer in model.mtp.layers)
    analytic = cost["flops_per_token"] + correction
    assert counted < analytic  # the MTP depth's T - 1 positions: the only difference
    assert counted == pytest.approx(analytic, rel=0.02)


# -- DeepSeek-V3 ------------------------------------------------------------------------------------------------------


def test_the_v3_recipe_validates_for_its_layout():
    result = run_dsk(["recipe", "validate", str(V3)])
    assert result.exit_code == 0, result.output
    from dsk_parallel.pipeline_validate import pipeline_launch_problems

    resolved = validate_recipe(load_recipe(V3), builtin_registry(), isolated_plugin_manager(), check=True).resolved
    assert pipeline_launch_problems(resolved, 2048) == []  # 16 pipeline ranks x 128 data ranks, EP 64 inside them
    assert [p.path for p in pipeline_launch_problems(resolved, 1000)] == ["parallel.pipeline.pp"]


def test_v3_parameter_counts_on_the_meta_device():
    cfg = _recipe_model_config(V3)
    start = time.perf_counter()
    with torch.device("meta"):
        model = build_model(cfg)
    built = time.perf_counter() - start
    cost = model_cost(model, seq_len=cfg.max_seq_len)
    print(
        f"V3 on meta: built in {built:.1f} s; " + ", ".join(f"{k} {v:.4g}" for k, v in cost.items() if k[0] in "pfak")
    )
    assert cost["params_total"] == _held(model)
    # the report's 671B leaves out the MTP module; the published weights (685B) add it with its own copy of the
    # embedding and head
    assert cost["params_without_mtp"] == pytest.approx(671e9, rel=0.01)
    assert cost["params_total"] + 2 * 129280 * 7168 == pytest.approx(685e9, rel=0.01)
    assert cost["params_mtp"] == pytest.approx(11.5e9, rel=0.02)  # README_WEIGHTS: 11.5B unique MTP parameters
    # 37B activated with the embedding and head counted (the weights' README: 36.7B); 35.7B without them
    assert cost["active_params_with_embeddings"] == pytest.approx(37e9, rel=0.03)
    assert cost["active_params_without_embeddings"] == pytest.approx(
        cost["active_params_with_embeddings"] - 2 * 129280 * 7168
    )
    assert cost["kv_bytes_per_token"] == 61 * (512 + 64) * 2


# -- saved activations: measured with saved-tensor hooks ---------------------------------------------------------------


def _saved_bytes_per_token(module: torch.nn.Module, n_tokens: int, *args) -> float:
    """Bytes of the distinct tensors a training forward of ``module`` saves for the backward, per token: every
    floating-point tensor with a dimension of the tokens (N, or the N*K routed rows), parameters and what is made
    of them alone (a concatenation of weights) left out."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        per_token = any(s % n_tokens == 0 and s >= n_tokens for s in t.shape)
        if t.is_floating_point() and per_token and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*args)
    return sum(saved.values()) / n_tokens


@pytest.mark.parametrize("part", ["mla", "mha", "dense", "moe", "norm"])
def test_saved_activation_bytes_match_what_the_forward_saves(monkeypatch, part):
    """float32 (act_bytes 4), the plain PyTorch paths: MLA and MHA through SDPA's fused kernel (T x T above the
    small-sequence threshold), the MoE through grouped GEMMs."""
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    sets = ("model.max_seq_len=1024",) + (('model.attention={type="mha", n_heads=4}',) if part == "mha" else ())
    torch.manual_seed(0)
    model = build_model(_recipe_model_config(RECIPES / "base" / "tiny-dsv3.toml", sets), 64).train()
    T = 600
    x = torch.randn(1, T, 64, requires_grad=True)
    module = {
        "mla": model.layers[0].self_attn,
        "mha": model.layers[0].self_attn,
        "dense": model.layers[0].mlp,
        "moe": model.layers[1].mlp,
        "norm": model.norm,
    }[part]
    args = (x, torch.arange(T)) if part in ("mla", "mha") else (x,)
    measured = _saved_bytes_per_token(module, T, *args)
    if part == "norm":
        from dsk.model.cost import _norm

        analytic = _norm(module, 4).activation_bytes_per_token
    else:
        analytic = module.cost(T, act_bytes=4).activation_bytes_per_token
    assert measured == pytest.approx(analytic, rel=0.02)


def test_cost_sums_recomputable_bytes_region_by_region_and_components_report_them():
    a = Cost(recomputable_bytes_per_token={"norm": 1.0, "ffn.activation": 2.0}, expert_params=3)
    b = Cost(recomputable_bytes_per_token={"norm": 10.0, "ffn.dispatch": 5.0}, expert_params=4)
    total = a + b
    assert total.recomputable_bytes_per_token == {"norm": 11.0, "ffn.activation": 2.0, "ffn.dispatch": 5.0}
    assert total.expert_params == 7
    model = build_model(tiny_config())
    moe = model.layers[1].mlp
    # TINY's MoE: 4 experts of 16 wide, 1 shared, top-2, D 32, at 4 bytes per value
    cost = moe.cost(16, act_bytes=4)
    assert cost.expert_params == moe.experts.w_gate.numel() * 3 == 4 * 3 * 32 * 16
    assert cost.recomputable_bytes_per_token == {"ffn.activation": (16 + 2 * 16) * 4.0, "ffn.dispatch": 2 * 32 * 4.0}
    assert model.layers[0].mlp.cost(16, 4).recomputable_bytes_per_token == {"ffn.activation": 48 * 4.0}
    # MLA: the latents' norms (q 16, c 16): normalised values, statistics and q_b_proj's copy of the query latent
    assert model.layers[0].self_attn.cost(16, 4).recomputable_bytes_per_token == {"norm": 16 * 4 + 4 + 2 * 16 * 4 + 4}
