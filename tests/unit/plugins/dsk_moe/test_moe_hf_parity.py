"""Parity with HF transformers ``DeepseekV3MoE`` (built from a tiny random config; nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from dsk_moe.config import MoEConfig, NoauxTCConfig
from dsk_moe.moe import MoE, hf_to_dsk
from dsk_moe.router import NoauxTCRouter

from dsk.api import ModelContext, ResolvedSlot

modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
DeepseekV3Config = pytest.importorskip("transformers").DeepseekV3Config

D, H, E, N_SHARED, K, N_GROUP, TOPK_GROUP, SCALE = 16, 8, 8, 2, 3, 4, 2, 2.5


def hf_per_expert_state_dict(hf_moe) -> dict[str, torch.Tensor]:
    """HF MoE weights under the on-disk names (``experts.{j}.gate_proj.weight``...), whatever the HF version."""
    sd = hf_moe.state_dict()
    if "experts.gate_up_proj" not in sd:  # transformers < 5: a ModuleList, already the on-disk names
        return sd
    gate_up, down = sd.pop("experts.gate_up_proj"), sd.pop("experts.down_proj")
    for j in range(gate_up.shape[0]):  # v5 fuses [gate; up] along dim 1 (spec §2.3 item 6)
        sd[f"experts.{j}.gate_proj.weight"] = gate_up[j, :H]
        sd[f"experts.{j}.up_proj.weight"] = gate_up[j, H:]
        sd[f"experts.{j}.down_proj.weight"] = down[j]
    return sd


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_matches_hf_deepseek_v3_moe_in_float32(norm_topk_prob):
    torch.manual_seed(0)
    hf_cfg = DeepseekV3Config(
        hidden_size=D,
        moe_intermediate_size=H,
        n_routed_experts=E,
        n_shared_experts=N_SHARED,
        num_experts_per_tok=K,
        n_group=N_GROUP,
        topk_group=TOPK_GROUP,
        routed_scaling_factor=SCALE,
        norm_topk_prob=norm_topk_prob,
        hidden_act="silu",
        experts_implementation="eager",
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=32,
    )
    hf = modeling.DeepseekV3MoE(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
        hf.gate.e_score_correction_bias.copy_(torch.randn(E) * 0.1)

    router = NoauxTCConfig(
        top_k=K, n_groups=N_GROUP, topk_groups=TOPK_GROUP, norm_topk_prob=norm_topk_prob, route_scale=SCALE
    )
    cfg = MoEConfig(
        n_routed_experts=E,
        n_shared_experts=N_SHARED,
        expert_hidden_dim=H,
        router=ResolvedSlot(kind="router", name="noaux_tc", config=router, impl=NoauxTCRouter),
    )
    ours = MoE(cfg, ModelContext(dim=D, n_layers=1, vocab_size=32, max_seq_len=16)).eval()
    missing, unexpected = ours.load_state_dict(hf_to_dsk(hf_per_expert_state_dict(hf)), strict=True)
    assert not missing and not unexpected

    x = torch.randn(3, 7, D)
    with torch.no_grad():
        expected = hf(x)
        got = ours(x)
        # the group limit must bind for some tokens, else this test would not exercise it
        scores = torch.sigmoid(x.view(-1, D) @ hf.gate.weight.T) + hf.gate.e_score_correction_bias
        free = scores.topk(K, dim=-1).indices.sort(-1).values
        limited = ours.gate(x.view(-1, D))[1].sort(-1).values
    assert not torch.equal(free, limited)
    # 1e-5 relative to the output scale: elementwise rtol is meaningless where the K+1 expert terms cancel to ~0,
    # and the two sides sum those terms in different orders in float32.
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
