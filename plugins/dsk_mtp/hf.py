"""HF DeepseekV3 mapping of the ``mtp`` heads: extra decoder layers after the main ones (spec §2.2).

Module k of ``mtp.layers`` is the checkpoint's ``model.layers.{num_hidden_layers + k}``. Its own parts (``enorm``,
``hnorm``, ``eh_proj``, ``shared_head.norm``) keep their names; the transformer block's parts sit at the layer's
top level in HF (``input_layernorm``, ``self_attn.*``, ``post_attention_layernorm``, ``mlp.*``) and under
``block.`` in dsk, mapped through the skeleton's block mapping so the attention and FFN adapters apply. The layer's
``embed_tokens`` and ``shared_head.head`` are copies of the shared embedding and output head: skipped on load,
written back as copies (the released weights carry them and the engines expect them).

The depth is the number of such layers present, not ``num_nextn_predict_layers``: checkpoints written by HF
``transformers`` declare the field but omit the MTP weights.
"""

from __future__ import annotations

import re
from typing import Any

from dsk.api import HFCheckpoint, HFLayout

__all__ = ["MTPAdapter"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_DSK_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
#: the layer's copies of the shared tensors: HF name -> dsk name of the shared tensor
_COPIES = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def extra_layers(keys: frozenset[str] | set[str], n_layers: int) -> int:
    """Number of decoder layers past the ``n_layers`` main ones whose tensors are present."""
    return len({int(m[1]) for k in keys if (m := _LAYER.match(k)) and int(m[1]) >= n_layers})


class MTPAdapter:
    """``dsk.api.HFAdapter`` of ``mtp``: the depth and the names of the prediction modules."""

    def claims(self, slot: str, ckpt: HFCheckpoint) -> bool:
        """The multi-token prediction slot of a checkpoint whose weights have layers past the main ones."""
        n_layers = ckpt.config.get("num_hidden_layers")
        return isinstance(n_layers, int) and extra_layers(ckpt.keys, n_layers) > 0

    def unsupported_hf_fields(self, ckpt: HFCheckpoint) -> list[str]:
        """None: every depth loads."""
        return []

    def config_from_hf(self, slot: str, ckpt: HFCheckpoint) -> dict[str, Any]:
        """``{"type": "mtp", "depth": <layers present>}`` (the loss weight is a training choice HF does not hold)."""
        return {"type": "mtp", "depth": extra_layers(ckpt.keys, int(ckpt.config["num_hidden_layers"]))}

    def config_to_hf(self, config: Any, where: str) -> dict[str, Any]:
        """``num_nextn_predict_layers``: the depth; 0 without MTP heads (HF's config would assume 1)."""
        return {"num_nextn_predict_layers": 0 if config is None else config.depth}

    def state_from_hf(self, state: dict[str, Any], layout: HFLayout) -> dict[str, Any]:
        """``model.layers.{n_layers + k}.*`` -> ``layers.{k}.*`` (the block's parts under ``block.``)."""
        out: dict[str, Any] = {}
        blocks: dict[int, dict[str, Any]] = {}
        for key, value in state.items():
            m = _LAYER.match(key)
            if m is None or int(m[1]) < layout.n_layers:
                out[key] = value  # not an extra layer: the strict load names it
                continue
            k, sub = int(m[1]) - layout.n_layers, m[2]
            if sub in _COPIES:
                continue
            if sub.startswith(_OWN):
                out[f"layers.{k}.{sub}"] = value
            else:
                blocks.setdefault(k, {})[sub] = value
        for k, sub_state in sorted(blocks.items()):
            for name, value in layout.block_from_hf(sub_state, layout.n_layers + k).items():
                out[f"layers.{k}.block.{name}"] = value
        return out

    def state_to_hf(self, state: dict[str, Any], layout: HFLayout) -> dict[str, Any]:
        """``layers.{k}.*`` -> ``model.layers.{n_layers + k}.*``, with the copies of the embedding and head."""
        out: dict[str, Any] = {}
        blocks: dict[int, dict[str, Any]] = {}
        depths: set[int] = set()
        for key, value in state.items():
            m = _DSK_LAYER.match(key)
            if m is None:
                out[key] = value
                continue
            k, sub = int(m[1]), m[2]
            depths.add(k)
            if sub.startswith("block."):
                blocks.setdefault(k, {})[sub[len("block.") :]] = value
            else:
                out[f"model.layers.{layout.n_layers + k}.{sub}"] = value
        for k, sub_state in sorted(blocks.items()):
            for name, value in layout.block_to_hf(sub_state, layout.n_layers + k).items():
                out[f"model.layers.{layout.n_layers + k}.{name}"] = value
        for k in sorted(depths):
            for hf_name, shared in _COPIES.items():
                out[f"model.layers.{layout.n_layers + k}.{hf_name}"] = layout.shared[shared]
        return out
