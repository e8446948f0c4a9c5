"""Configs of the FFN and router components of dsk_moe (torch-free, so recipes validate without torch).

Recipe tables map one to one onto these models::

    [model.ffn]                    # MoEConfig
    type = "moe"
    n_routed_experts = 64
    [model.ffn.router]             # NoauxTCConfig
    type = "noaux_tc"
    top_k = 6
    n_groups = 8
    topk_groups = 4

Cross-field rules that need both the router and the expert count (``top_k <= n_routed_experts``, groups dividing
the experts) live in :func:`router_fit_problems`, called by ``MoEConfig``'s validator and again by every router's
constructor, so a router built by hand is checked too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from dsk.api import BaseConfig, ResolvedSlot, Slot, SlotField

__all__ = [
    "DenseConfig",
    "MoEConfig",
    "GreedyConfig",
    "AuxLossConfig",
    "NoauxTCConfig",
    "router_fit_problems",
]

ScoreFunc = Literal["sigmoid", "softmax"]


class DenseConfig(BaseConfig):
    """Dense SwiGLU FFN (the first ``first_k_dense`` layers of DeepSeek-V3)."""

    hidden_dim: int = Field(1024, ge=1, le=2**20, description="SwiGLU hidden width (HF intermediate_size; V3: 18432)")

    def linear_in_features(self, dim: int) -> dict[str, int]:
        """The Ks besides D (:class:`dsk.api.LinearShapes`): down_proj's, the hidden width."""
        return {"hidden_dim": self.hidden_dim}


class _TopKRouterConfig(BaseConfig):
    """Options shared by every top-k router."""

    top_k: int = Field(2, ge=1, description="routed experts per token (K_r; HF num_experts_per_tok; V3: 8)")
    score_func: ScoreFunc = Field("softmax", description="affinity function of the router logits")
    norm_topk_prob: bool = Field(
        False, description="renormalise the K selected affinities to sum to 1 before route_scale"
    )
    route_scale: float = Field(
        1.0, gt=0, description="factor applied to the routing weights (HF routed_scaling_factor; V3: 2.5)"
    )


class GreedyConfig(_TopKRouterConfig):
    """Plain top-k routing with no load balancing at all (ablation baseline)."""


class AuxLossConfig(_TopKRouterConfig):
    """Top-k routing balanced by the classic Switch/GShard auxiliary loss ``alpha * E * sum_i f_i P_i``."""

    aux_alpha: float = Field(0.01, ge=0, description="weight of the batch-wise auxiliary balance loss (0 disables it)")


class NoauxTCConfig(_TopKRouterConfig):
    """DeepSeek-V3 routing: sigmoid affinities, group-limited top-k, auxiliary-loss-free bias balancing."""

    score_func: ScoreFunc = Field("sigmoid", description="affinity function of the router logits (V3: sigmoid)")
    norm_topk_prob: bool = Field(
        True, description="renormalise the K selected affinities to sum to 1 before route_scale (V3: true)"
    )
    n_groups: int = Field(
        1, ge=1, description="expert groups (nodes) for group-limited routing (HF n_group; V3: 8; 1 disables)"
    )
    topk_groups: int = Field(1, ge=1, description="groups a token may be routed to (M; HF topk_group; V3: 4)")
    group_score: Literal["top2_sum", "max"] = Field(
        "top2_sum",
        description="rank groups by the sum of their top-2 biased scores (V3/HF rule) or by their max score",
    )
    bias_update_speed: float = Field(
        1e-3, ge=0, description="gamma of the sign rule b_i += gamma * sign(mean(c) - c_i), once per step (0 freezes b)"
    )
    seq_aux_alpha: float = Field(
        1e-4, ge=0, description="weight of the complementary sequence-wise balance loss (V3: 1e-4; 0 disables it)"
    )

    @model_validator(mode="after")
    def _groups_are_consistent(self) -> NoauxTCConfig:
        if self.topk_groups > self.n_groups:
            raise ValueError(f"router.topk_groups = {self.topk_groups}: must be <= router.n_groups = {self.n_groups}")
        return self


def router_fit_problems(router: Any, n_experts: int, prefix: str = "router.") -> list[str]:
    """Problems between a router config and the number of routed experts (empty list when it fits).

    Args:
        router: a router config (any object with ``top_k``; group fields are optional).
        n_experts: routed experts of the MoE layer.
        prefix: dotted key of the router table, used in the messages.
    """
    problems: list[str] = []
    top_k = getattr(router, "top_k", None)
    if top_k is not None and top_k > n_experts:
        problems.append(f"{prefix}top_k = {top_k}: must be <= n_routed_experts = {n_experts}")
    n_groups = getattr(router, "n_groups", 1)
    if n_groups > 1:
        if n_experts % n_groups:
            problems.append(f"{prefix}n_groups = {n_groups}: must divide n_routed_experts = {n_experts}")
            return problems
        per_group = n_experts // n_groups
        topk_groups = getattr(router, "topk_groups", n_groups)
        if top_k is not None and top_k > topk_groups * per_group:
            problems.append(
                f"{prefix}top_k = {top_k}: must be <= topk_groups * experts per group = "
                f"{topk_groups} * {per_group} = {topk_groups * per_group}"
            )
        if getattr(router, "group_score", None) == "top2_sum" and per_group < 2:
            problems.append(
                f"{prefix}group_score = 'top2_sum' needs >= 2 experts per group, got "
                f"n_routed_experts / n_groups = {n_experts} / {n_groups} = {per_group}; use 'max' or fewer groups"
            )
    return problems


class MoEConfig(BaseConfig):
    """DeepSeekMoE layer: shared experts plus routed experts chosen by a router slot."""

    n_routed_experts: int = Field(16, ge=1, le=2**16, description="routed experts N_r (HF n_routed_experts; V3: 256)")
    n_shared_experts: int = Field(
        1,
        ge=0,
        le=2**10,
        description="shared experts N_s, fused into one SwiGLU of n_shared * expert_hidden_dim (V3: 1)",
    )
    expert_hidden_dim: int = Field(
        256, ge=1, le=2**20, description="hidden width of one expert (HF moe_intermediate_size; V3: 2048)"
    )
    router: Annotated[ResolvedSlot, Slot("router")] = SlotField(
        "router", default="noaux_tc", description="router choosing top_k routed experts per token"
    )
    dispatch: Literal["cpu_kernel", "grouped_mm", "loop_slices", "auto"] = Field(
        "auto",
        description="routed-expert GEMMs: the CPU kernel (experts split over threads, SwiGLU fused), one "
        "torch._grouped_mm per projection, one matmul per expert slice, or auto (the CPU kernel for small "
        "experts on CPU, else grouped_mm where torch supports the device/dtype, else slices)",
    )

    def linear_in_features(self, dim: int) -> dict[str, int]:
        """The Ks besides D (:class:`dsk.api.LinearShapes`): the experts' down projections (shared ones fused)."""
        ks = {"expert_hidden_dim": self.expert_hidden_dim}
        if self.n_shared_experts > 1:
            ks["n_shared_experts"] = self.n_shared_experts * self.expert_hidden_dim
        return ks

    @model_validator(mode="after")
    def _router_fits_experts(self) -> MoEConfig:
        problems = router_fit_problems(getattr(self.router, "config", None), self.n_routed_experts)
        if problems:
            raise ValueError("; ".join(problems))
        return self
