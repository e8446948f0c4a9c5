"""The HF adapter of ``mla``: config table -> HF fields -> table, the RoPE/YaRN table, refused values, weight names."""

from __future__ import annotations

import pytest
import torch
from dsk_mla.config import MLAConfig
from dsk_mla.hf import MLAAdapter
from dsk_mla.mla import MLA

from dsk.api import HFAdapter, HFCheckpoint, HFLayout, ModelContext

ADAPTER = MLAAdapter()
TABLE = {
    "n_heads": 2,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "rope_theta": 50000.0,
}
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.0,
}


def _round_trip(table: dict) -> dict:
    hf = ADAPTER.config_to_hf(MLAConfig.model_validate(table), "model.attention")
    ckpt = HFCheckpoint(config={**hf, "max_position_embeddings": 256})
    assert ADAPTER.claims("attention", ckpt)
    assert ADAPTER.unsupported_hf_fields(ckpt) == []
    return ADAPTER.config_from_hf("attention", ckpt)


def test_adapter_implements_the_hf_adapter_protocol():
    assert isinstance(ADAPTER, HFAdapter)


@pytest.mark.parametrize(
    "table",
    [TABLE, {**TABLE, "q_lora_rank": None}, {**TABLE, "rope_scaling": YARN}],
    ids=["v3", "no_q_compression", "yarn"],
)
def test_config_round_trips_through_hf_fields(table):
    assert _round_trip(table) == {"type": "mla", **table}


def test_hf_fields_are_the_deepseek_v3_names():
    hf = ADAPTER.config_to_hf(MLAConfig.model_validate({**TABLE, "rope_scaling": YARN}), "model.attention")
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["kv_lora_rank"]) == (2, 2, 16)
    assert hf["rope_parameters"]["rope_type"] == hf["rope_parameters"]["type"] == "yarn"
    assert hf["rope_parameters"]["mscale"] == 0.707 and hf["rope_theta"] == 50000.0
    assert ADAPTER.config_to_hf(None, "model.attention") == {}  # an empty slot sets nothing


def test_old_style_rope_scaling_with_unset_mscale_reads_as_zero():
    hf = ADAPTER.config_to_hf(MLAConfig.model_validate(TABLE), "model.attention")
    del hf["rope_parameters"]
    hf["rope_scaling"] = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}
    table = ADAPTER.config_from_hf("attention", HFCheckpoint(config=hf))
    assert table["rope_scaling"]["mscale"] == table["rope_scaling"]["mscale_all_dim"] == 0.0
    assert table["rope_scaling"]["factor"] == 8.0 and table["rope_theta"] == 50000.0


def test_values_mla_cannot_reproduce_are_all_named():
    hf = ADAPTER.config_to_hf(MLAConfig.model_validate(TABLE), "model.attention")
    hf.update(attention_bias=True, rope_interleave=False, rope_parameters={"rope_type": "llama3"})
    del hf["v_head_dim"]
    problems = ADAPTER.unsupported_hf_fields(HFCheckpoint(config=hf))
    assert len(problems) == 4
    assert any(p.startswith("attention_bias = true") for p in problems)
    assert any(p.startswith("rope_interleave = false") for p in problems)
    assert "rope type 'llama3' is not supported (only default and yarn)" in problems
    assert "v_head_dim is missing" in problems


def test_claims_only_the_attention_slot_of_a_config_with_a_kv_latent():
    hf = ADAPTER.config_to_hf(MLAConfig.model_validate(TABLE), "model.attention")
    assert not ADAPTER.claims("ffn", HFCheckpoint(config=hf))
    del hf["kv_lora_rank"]
    assert not ADAPTER.claims("attention", HFCheckpoint(config=hf))


def test_weight_names_round_trip_and_load_into_mla():
    mla = MLA(MLAConfig.model_validate(TABLE), ModelContext(dim=32, n_layers=1, vocab_size=8, max_seq_len=16))
    state = mla.state_dict()
    layout = HFLayout(n_layers=1, block_from_hf=dict, block_to_hf=dict)
    hf = ADAPTER.state_to_hf(state, layout)
    assert {"q_a_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight", "o_proj.weight"} <= set(hf)
    back = ADAPTER.state_from_hf(hf, layout)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    mla.load_state_dict(back, strict=True)
