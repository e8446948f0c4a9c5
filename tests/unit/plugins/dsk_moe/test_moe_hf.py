"""The HF adapters of ``moe`` (with its router) and ``dense``: config round trips, refused configs, expert stacking."""

from __future__ import annotations

import pytest
import torch
from dsk_moe.config import DenseConfig, MoEConfig
from dsk_moe.hf import DenseAdapter, MoEAdapter

from dsk.api import HFAdapter, HFCheckpoint, HFLayout
from dsk.registry import build_registry
from dsk.testing import isolated_plugin_manager

MOE = MoEAdapter()
DENSE = DenseAdapter()
LAYOUT = HFLayout(n_layers=2, block_from_hf=dict, block_to_hf=dict)
TABLE = {
    "type": "moe",
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "expert_hidden_dim": 16,
    "router": {
        "type": "noaux_tc",
        "top_k": 3,
        "score_func": "sigmoid",
        "norm_topk_prob": False,
        "route_scale": 2.5,
        "n_groups": 4,
        "topk_groups": 2,
        "group_score": "top2_sum",
        "seq_aux_alpha": 0.001,
    },
}


@pytest.fixture(scope="module")
def registry():
    return build_registry(isolated_plugin_manager())


def _moe(table: dict, registry) -> MoEConfig:
    return MoEConfig.model_validate({k: v for k, v in table.items() if k != "type"}, context={"registry": registry})


def test_adapters_implement_the_hf_adapter_protocol():
    assert isinstance(MOE, HFAdapter) and isinstance(DENSE, HFAdapter)


def test_moe_and_router_config_round_trip_through_hf_fields(registry):
    hf = MOE.config_to_hf(_moe(TABLE, registry), "model.ffn")
    assert (hf["n_group"], hf["topk_group"], hf["routed_scaling_factor"], hf["num_experts_per_tok"]) == (4, 2, 2.5, 3)
    ckpt = HFCheckpoint(config=hf)
    assert MOE.claims("ffn", ckpt) and not MOE.claims("dense_ffn", ckpt)
    assert MOE.unsupported_hf_fields(ckpt) == []
    assert MOE.config_from_hf("ffn", ckpt) == TABLE


def test_dense_config_round_trips_and_claims_only_the_dense_slot():
    hf = DENSE.config_to_hf(DenseConfig(hidden_dim=48), "model.dense_ffn")
    assert hf == {"intermediate_size": 48, "hidden_act": "silu"}
    ckpt = HFCheckpoint(config=hf)
    assert DENSE.claims("dense_ffn", ckpt) and not DENSE.claims("ffn", ckpt)
    assert DENSE.config_from_hf("dense_ffn", ckpt) == {"type": "dense", "hidden_dim": 48}


def test_a_router_hf_cannot_express_is_refused_naming_its_key(registry):
    aux = {**TABLE, "router": {"type": "aux_loss", "top_k": 2}}
    with pytest.raises(ValueError, match=r"model\.ffn\.router = 'aux_loss' \(HF DeepseekV3 needs 'noaux_tc'\)"):
        MOE.config_to_hf(_moe(aux, registry), "model.ffn")
    by_max = {**TABLE, "router": {**TABLE["router"], "group_score": "max"}}
    with pytest.raises(ValueError, match=r"model\.ffn\.router\.group_score must be 'top2_sum'"):
        MOE.config_to_hf(_moe(by_max, registry), "model.ffn")


def test_hf_values_the_moe_cannot_reproduce_are_all_named(registry):
    hf = MOE.config_to_hf(_moe(TABLE, registry), "model.ffn")
    hf.update(hidden_act="gelu", moe_layer_freq=2, topk_method="greedy")
    del hf["moe_intermediate_size"]
    assert sorted(MOE.unsupported_hf_fields(HFCheckpoint(config=hf))) == [
        "hidden_act = 'gelu': only 'silu' (SwiGLU) is supported",
        "moe_intermediate_size is missing",
        "moe_layer_freq = 2: only 1 (every layer after the dense ones) works",
        "topk_method = 'greedy': only 'noaux_tc' is supported",
    ]


def _moe_state(n_experts=3, hidden=4, dim=5):
    g = torch.Generator().manual_seed(0)
    return {
        "gate.weight": torch.randn(n_experts, dim, generator=g),
        "gate.e_score_correction_bias": torch.randn(n_experts, generator=g),
        "experts.w_gate": torch.randn(n_experts, hidden, dim, generator=g, dtype=torch.float64),
        "experts.w_up": torch.randn(n_experts, hidden, dim, generator=g, dtype=torch.float64),
        "experts.w_down": torch.randn(n_experts, dim, hidden, generator=g, dtype=torch.float64),
        "shared_experts.gate_proj.weight": torch.randn(hidden, dim, generator=g),
    }


def test_routed_experts_are_unstacked_to_hf_names_and_stacked_back_bit_for_bit():
    state = _moe_state()
    hf = MOE.state_to_hf(state, LAYOUT)
    assert {f"experts.{j}.{p}_proj.weight" for j in range(3) for p in ("gate", "up", "down")} <= set(hf)
    assert "experts.w_gate" not in hf and "gate.e_score_correction_bias" in hf
    assert torch.equal(hf["experts.2.down_proj.weight"], state["experts.w_down"][2])
    back = MOE.state_from_hf(hf, LAYOUT)
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_a_missing_expert_is_named():
    hf = MOE.state_to_hf(_moe_state(), LAYOUT)
    del hf["experts.1.up_proj.weight"]
    with pytest.raises(ValueError, match=r"expert 1 of experts \(up_proj\) is missing"):
        MOE.state_from_hf(hf, LAYOUT)
