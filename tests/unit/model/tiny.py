"""Tiny model tables for the model tests (also imported by tests/unit/plugins/dsk_mtp)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from dsk.model.build import build_model
from dsk.model.config import ModelConfig
from dsk.testing import builtin_registry

VOCAB = 48

TINY: dict[str, Any] = {
    "vocab_size": VOCAB,
    "dim": 32,
    "n_layers": 3,
    "first_k_dense": 1,
    "max_seq_len": 64,
    "attention": {
        "type": "mla",
        "n_heads": 2,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 8,
    },
    "dense_ffn": {"type": "dense", "hidden_dim": 48},
    "ffn": {
        "type": "moe",
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "expert_hidden_dim": 16,
        "router": {"type": "noaux_tc", "top_k": 2, "n_groups": 2, "topk_groups": 1},
    },
    "mtp": {"type": "mtp", "depth": 2},
}


def tiny_config(**overrides: Any) -> ModelConfig:
    """``TINY`` with top-level keys replaced (``mtp=None`` drops the MTP heads), validated via the registry."""
    table = copy.deepcopy(TINY)
    for key, value in overrides.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return builtin_registry().validate(ModelConfig, table)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: Any):
    """A seeded tiny model in eval mode (float64 by default, so token-exact comparisons have no ties)."""
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides)).to(dtype).eval()
