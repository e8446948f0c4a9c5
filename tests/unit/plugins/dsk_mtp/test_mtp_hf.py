"""The HF adapter of ``mtp``: the depth from the tensors present, the layer renaming, the embedding/head copies."""

from __future__ import annotations

import torch
from dsk_mtp.config import MTPConfig
from dsk_mtp.hf import MTPAdapter

from dsk.api import HFAdapter, HFCheckpoint, HFLayout

ADAPTER = MTPAdapter()
N_LAYERS = 3


def _tagged_block(tensors: dict, layer_idx: int, tag: str) -> dict:
    # a stand-in for the skeleton's block mapping: renames visibly, so the test sees it was used with the right index
    return {f"{tag}{layer_idx}.{k}": v for k, v in tensors.items()}


def _untag(tensors: dict, layer_idx: int, tag: str) -> dict:
    prefix = f"{tag}{layer_idx}."
    assert all(k.startswith(prefix) for k in tensors)
    return {k[len(prefix) :]: v for k, v in tensors.items()}


def _layout(shared=None) -> HFLayout:
    return HFLayout(
        n_layers=N_LAYERS,
        block_from_hf=lambda t, i: _tagged_block(t, i, "dsk"),
        block_to_hf=lambda t, i: _untag(t, i, "dsk"),
        shared=shared or {},
    )


def _mtp_state(depth=2):
    g = torch.Generator().manual_seed(0)
    state = {}
    for k in range(depth):
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"):
            state[f"layers.{k}.{name}"] = torch.randn(4, generator=g)
        for name in ("input_layernorm.weight", "self_attn.o_proj.weight", "mlp.gate.weight"):
            state[f"layers.{k}.block.dsk{N_LAYERS + k}.{name}"] = torch.randn(4, generator=g)
    return state


def test_adapter_implements_the_hf_adapter_protocol():
    assert isinstance(ADAPTER, HFAdapter)


def test_config_round_trip_takes_the_depth_from_the_layers_present():
    hf = {"num_hidden_layers": N_LAYERS, **ADAPTER.config_to_hf(MTPConfig(depth=2), "model.mtp")}
    assert hf["num_nextn_predict_layers"] == 2
    keys = frozenset({"model.layers.2.mlp.gate.weight", "model.layers.3.eh_proj.weight", "model.layers.4.enorm.weight"})
    ckpt = HFCheckpoint(config=hf, keys=keys)
    assert ADAPTER.claims("mtp", ckpt) and ADAPTER.unsupported_hf_fields(ckpt) == []
    assert ADAPTER.config_from_hf("mtp", ckpt) == {"type": "mtp", "depth": 2}


def test_a_checkpoint_without_extra_layers_has_no_mtp_even_if_the_config_declares_them():
    # HF transformers writes num_nextn_predict_layers but not the MTP weights
    ckpt = HFCheckpoint(config={"num_hidden_layers": N_LAYERS, "num_nextn_predict_layers": 1}, keys=frozenset())
    assert not ADAPTER.claims("mtp", ckpt)
    assert ADAPTER.config_to_hf(None, "model.mtp") == {"num_nextn_predict_layers": 0}


def test_layers_are_renamed_with_copies_written_and_skipped_and_blocks_mapped_by_the_skeleton():
    state = _mtp_state()
    embed, head = torch.ones(2, 4), torch.full((2, 4), 2.0)
    hf = ADAPTER.state_to_hf(state, _layout({"embed_tokens.weight": embed, "lm_head.weight": head}))
    assert torch.equal(hf["model.layers.3.eh_proj.weight"], state["layers.0.eh_proj.weight"])
    assert torch.equal(hf["model.layers.4.shared_head.norm.weight"], state["layers.1.shared_head.norm.weight"])
    assert torch.equal(hf["model.layers.4.mlp.gate.weight"], state["layers.1.block.dsk4.mlp.gate.weight"])
    assert hf["model.layers.3.embed_tokens.weight"] is embed and hf["model.layers.4.shared_head.head.weight"] is head

    back = ADAPTER.state_from_hf(hf, _layout())
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())
