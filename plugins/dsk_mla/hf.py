"""HF ``DeepseekV3Config`` mapping of the ``mla`` attention: its config fields and RoPE/YaRN table (spec §2.1-2.3).

The weights need no renaming: :class:`dsk_mla.mla.MLA` uses the names of HF's ``DeepseekV3Attention``
(``q_a_proj``, ``q_a_layernorm``, ``q_b_proj`` or ``q_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``,
``kv_b_proj``, ``o_proj``).
"""

from __future__ import annotations

from typing import Any

from dsk.api import HFCheckpoint, HFLayout

__all__ = ["MLAAdapter"]

#: HF fields the attention cannot be built without
_REQUIRED = ("num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _rope_params(hf: dict[str, Any]) -> dict[str, Any]:
    # HF v5 writes ``rope_parameters``, older versions ``rope_scaling`` (with ``rope_theta`` at the top level)
    return dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})


def _rope_kind(params: dict[str, Any]) -> str:
    return params.get("rope_type", params.get("type", "default"))


def _rope_problems(hf: dict[str, Any]) -> list[str]:
    params = _rope_params(hf)
    kind = _rope_kind(params)
    if kind not in ("default", "yarn"):
        return [f"rope type {kind!r} is not supported (only default and yarn)"]
    if kind == "yarn" and (params.get("attention_factor") is not None or params.get("truncate", True) is not True):
        return ["yarn 'attention_factor' and 'truncate' = false are not supported"]
    return []


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, the dsk ``rope_scaling`` table or None)."""
    params = _rope_params(hf)
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if _rope_kind(params) == "default":
        return theta, None
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 4096)
    factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
    # HF semantics: a missing or zero mscale / mscale_all_dim means "unset"; dsk spells that 0.
    return theta, {
        "type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": int(original),
        "beta_fast": float(params.get("beta_fast") or 32),
        "beta_slow": float(params.get("beta_slow") or 1),
        "mscale": float(params.get("mscale") or 0),
        "mscale_all_dim": float(params.get("mscale_all_dim") or 0),
    }


def _rope_to_hf(config: Any) -> dict[str, Any]:
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    y = config.rope_scaling
    # both spellings of the kind: HF v5 reads rope_type, older readers type
    return {
        "rope_type": "yarn",
        "type": "yarn",
        "rope_theta": config.rope_theta,
        "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position_embeddings,
        "beta_fast": y.beta_fast,
        "beta_slow": y.beta_slow,
        "mscale": y.mscale,
        "mscale_all_dim": y.mscale_all_dim,
    }


class MLAAdapter:
    """``dsk.api.HFAdapter`` of ``mla``: HF DeepseekV3's attention fields <-> :class:`dsk_mla.config.MLAConfig`."""

    def claims(self, slot: str, ckpt: HFCheckpoint) -> bool:
        """The attention slot of a config that has a KV latent rank."""
        return slot == "attention" and "kv_lora_rank" in ckpt.config

    def unsupported_hf_fields(self, ckpt: HFCheckpoint) -> list[str]:
        """Attention biases, non-interleaved RoPE, rope kinds other than default/yarn, missing sizes."""
        hf = ckpt.config
        problems = []
        if hf.get("attention_bias", False):
            problems.append("attention_bias = true is not supported (DeepSeek-V3 has no attention biases)")
        if hf.get("rope_interleave", True) is not True:
            problems.append("rope_interleave = false is not supported (dsk reads rope dims as interleaved pairs)")
        problems += _rope_problems(hf)
        problems += [f"{key} is missing" for key in _REQUIRED if hf.get(key) is None]
        return problems

    def config_from_hf(self, slot: str, ckpt: HFCheckpoint) -> dict[str, Any]:
        """The ``[model.attention]`` table (``rope_scaling`` only when the config has a YaRN table)."""
        hf = ckpt.config
        theta, scaling = _rope_from_hf(hf)
        table: dict[str, Any] = {
            "type": "mla",
            "n_heads": int(hf["num_attention_heads"]),
            "q_lora_rank": hf.get("q_lora_rank"),
            "kv_lora_rank": int(hf["kv_lora_rank"]),
            "qk_nope_head_dim": int(hf["qk_nope_head_dim"]),
            "qk_rope_head_dim": int(hf["qk_rope_head_dim"]),
            "v_head_dim": int(hf["v_head_dim"]),
            "rope_theta": theta,
        }
        if scaling is not None:
            table["rope_scaling"] = scaling
        return table

    def config_to_hf(self, config: Any, where: str) -> dict[str, Any]:
        """Heads, ranks, head dims and the RoPE fields (``rope_theta`` and ``rope_parameters``)."""
        if config is None:
            return {}
        return {
            "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_heads,  # every head reads the one latent: HF counts them as KV heads
            "kv_lora_rank": config.kv_lora_rank,
            "q_lora_rank": config.q_lora_rank,
            "qk_rope_head_dim": config.qk_rope_head_dim,
            "v_head_dim": config.v_head_dim,
            "qk_nope_head_dim": config.qk_nope_head_dim,
            "rope_theta": config.rope_theta,
            "rope_parameters": _rope_to_hf(config),
            "rope_interleave": True,
            "attention_bias": False,
        }

    def state_from_hf(self, state: dict[str, Any], layout: HFLayout) -> dict[str, Any]:
        """The names are HF's already."""
        return dict(state)

    def state_to_hf(self, state: dict[str, Any], layout: HFLayout) -> dict[str, Any]:
        """The names are HF's already."""
        return dict(state)
