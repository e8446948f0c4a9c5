"""HF ``DeepseekV3Config`` mapping of the ``moe`` FFN (with its ``noaux_tc`` router) and the ``dense`` FFN.

Weights: HF stores each routed expert as its own SwiGLU, ``experts.{j}.{gate,up,down}_proj.weight``; dsk stacks
them into ``experts.w_{gate,up,down}`` [E, out, in] for its grouped GEMMs (spec §2.2). The router (``gate.weight``,
``gate.e_score_correction_bias``), the shared experts and the dense FFN keep HF's names.

HF DeepseekV3 has one router, the group-limited, bias-balanced top-k of ``topk_method = "noaux_tc"``: a MoE whose
router slot holds another router has no HF form.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from dsk.api import HFCheckpoint, HFLayout

__all__ = ["DenseAdapter", "MoEAdapter"]

_HF_EXPERT = re.compile(r"^experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_DSK_EXPERT = re.compile(r"^experts\.w_(gate|up|down)$")
_PROJS = ("gate", "up", "down")


def _swiglu_problems(hf: dict[str, Any]) -> list[str]:
    if hf.get("hidden_act", "silu") != "silu":
        return [f"hidden_act = {hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported"]
    return []


class MoEAdapter:
    """``dsk.api.HFAdapter`` of ``moe``: the MoE and router fields, and the stacking of the routed experts."""

    #: HF fields the MoE layer cannot be built without
    required = ("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")

    def claims(self, slot: str, ckpt: HFCheckpoint) -> bool:
        """The FFN of the layers after the dense ones, in a config with routed experts."""
        return slot == "ffn" and "n_routed_experts" in ckpt.config

    def unsupported_hf_fields(self, ckpt: HFCheckpoint) -> list[str]:
        """Activations other than SiLU, MoE layers not on every layer, routers other than noaux_tc, missing sizes."""
        hf = ckpt.config
        problems = _swiglu_problems(hf)
        if hf.get("moe_layer_freq", 1) != 1:
            problems.append(f"moe_layer_freq = {hf['moe_layer_freq']}: only 1 (every layer after the dense ones) works")
        if hf.get("topk_method", "noaux_tc") != "noaux_tc":
            problems.append(f"topk_method = {hf['topk_method']!r}: only 'noaux_tc' is supported")
        problems += [f"{key} is missing" for key in self.required if hf.get(key) is None]
        return problems

    def config_from_hf(self, slot: str, ckpt: HFCheckpoint) -> dict[str, Any]:
        """The ``[model.ffn]`` table with its ``router`` table."""
        hf = ckpt.config
        n_group = hf.get("n_group") or 1
        router: dict[str, Any] = {
            "type": "noaux_tc",
            "top_k": int(hf["num_experts_per_tok"]),
            "score_func": hf.get("scoring_func", "sigmoid"),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
            "route_scale": float(hf.get("routed_scaling_factor", 1.0)),
            "n_groups": int(n_group),
            "topk_groups": int(hf.get("topk_group") or n_group),
            "group_score": "top2_sum",
        }
        if hf.get("aux_loss_alpha") is not None and hf.get("seq_aux", True):
            # DeepSeek's remote-code configs name the sequence-wise balance loss weight aux_loss_alpha (seq_aux = true)
            router["seq_aux_alpha"] = float(hf["aux_loss_alpha"])
        return {
            "type": "moe",
            "n_routed_experts": int(hf["n_routed_experts"]),
            "n_shared_experts": int(hf.get("n_shared_experts") or 0),
            "expert_hidden_dim": int(hf["moe_intermediate_size"]),
            "router": router,
        }

    def config_to_hf(self, config: Any, where: str) -> dict[str, Any]:
        """Expert counts and sizes and the router's fields.

        Raises:
            ValueError: the router is not ``noaux_tc`` with ``group_score = 'top2_sum'`` (HF's only router).
        """
        if config is None:
            return {}
        router_slot = config.router
        if router_slot.name != "noaux_tc":
            raise ValueError(f"{where}.router = {router_slot.name!r} (HF DeepseekV3 needs 'noaux_tc')")
        router = router_slot.config
        if router.group_score != "top2_sum":
            raise ValueError(f"{where}.router.group_score must be 'top2_sum'")
        return {
            "moe_intermediate_size": config.expert_hidden_dim,
            "n_shared_experts": config.n_shared_experts,
            "n_routed_experts": config.n_routed_experts,
            "routed_scaling_factor": router.route_scale,
            "n_group": router.n_groups,
            "topk_group": router.topk_groups,
            "num_experts_per_tok": router.top_k,
            "norm_topk_prob": router.norm_topk_prob,
            "scoring_func": router.score_func,
            "topk_method": "noaux_tc",
            "aux_loss_alpha": router.seq_aux_alpha,
            "seq_aux": True,
            "hidden_act": "silu",
        }

    def state_from_hf(self, state: dict[str, Any], layout: HFLayout) -> dict[str, Any]:
        """Stack ``experts.{j}.{p}_proj.weight`` into ``experts.w_{p}`` [E, out, in]; other names are HF's.

        Raises:
            ValueError: an expert index below the highest one is missing.
        """
        out: dict[str, Any] = {}
        experts: dict[str, dict[int, torch.Tensor]] = {}
        for key, value in state.items():
            if m := _HF_EXPERT.match(key):
                experts.setdefault(m[2], {})[int(m[1])] = value
            else:
                out[key] = value
        for proj in _PROJS:
            by_index = experts.get(proj)
            if not by_index:
                continue
            n = max(by_index) + 1
            missing = sorted(set(range(n)) - set(by_index))
            if missing:
                raise ValueError(f"expert {missing[0]} of experts ({proj}_proj) is missing")
            out[f"experts.w_{proj}"] = torch.stack([by_index[j] for j in range(n)])
        return out

    def state_to_hf(self, state: dict[str, Any], layout: HFLayout) -> dict[str, Any]:
        """Unbind ``experts.w_{p}`` into ``experts.{j}.{p}_proj.weight`` (views, not copies)."""
        out: dict[str, Any] = {}
        for key, value in state.items():
            if m := _DSK_EXPERT.match(key):
                for j, w in enumerate(value.unbind(0)):
                    out[f"experts.{j}.{m[1]}_proj.weight"] = w
            else:
                out[key] = value
        return out


class DenseAdapter:
    """``dsk.api.HFAdapter`` of ``dense``: the SwiGLU FFN of HF DeepseekV3's first ``first_k_dense_replace`` layers."""

    def claims(self, slot: str, ckpt: HFCheckpoint) -> bool:
        """The FFN of the dense layers, in a config with an intermediate size."""
        return slot == "dense_ffn" and "intermediate_size" in ckpt.config

    def unsupported_hf_fields(self, ckpt: HFCheckpoint) -> list[str]:
        """Activations other than SiLU, a missing intermediate size."""
        problems = _swiglu_problems(ckpt.config)
        if ckpt.config.get("intermediate_size") is None:
            problems.append("intermediate_size is missing")
        return problems

    def config_from_hf(self, slot: str, ckpt: HFCheckpoint) -> dict[str, Any]:
        """``{"type": "dense", "hidden_dim": intermediate_size}``."""
        return {"type": "dense", "hidden_dim": int(ckpt.config["intermediate_size"])}

    def config_to_hf(self, config: Any, where: str) -> dict[str, Any]:
        """``intermediate_size`` and the SiLU activation."""
        if config is None:
            return {}
        return {"intermediate_size": config.hidden_dim, "hidden_act": "silu"}

    def state_from_hf(self, state: dict[str, Any], layout: HFLayout) -> dict[str, Any]:
        """The names are HF's already (``{gate,up,down}_proj.weight``)."""
        return dict(state)

    def state_to_hf(self, state: dict[str, Any], layout: HFLayout) -> dict[str, Any]:
        """The names are HF's already."""
        return dict(state)
