"""Registers the FFN and router components of dsk_moe. Torch-free: implementations are named by lazy strings."""

from __future__ import annotations

from dsk import hookimpl
from dsk_moe.config import AuxLossConfig, DenseConfig, GreedyConfig, MoEConfig, NoauxTCConfig


@hookimpl
def register_model_components(register):
    register(
        "ffn",
        "moe",
        "dsk_moe.moe:MoE",
        config=MoEConfig,
        hf="dsk_moe.hf:MoEAdapter",
        summary="DeepSeekMoE: fused shared experts + top-k routed experts with grouped GEMM dispatch",
    )
    register(
        "ffn",
        "dense",
        "dsk_moe.experts:Dense",
        config=DenseConfig,
        hf="dsk_moe.hf:DenseAdapter",
        summary="dense SwiGLU FFN",
    )
    register(
        "router",
        "noaux_tc",
        "dsk_moe.router:NoauxTCRouter",
        config=NoauxTCConfig,
        summary="DeepSeek-V3 router: group-limited top-k, aux-loss-free bias balancing, sequence-wise loss",
    )
    register(
        "router",
        "aux_loss",
        "dsk_moe.router:AuxLossRouter",
        config=AuxLossConfig,
        summary="top-k router balanced by the Switch/GShard auxiliary loss (baseline)",
    )
    register(
        "router",
        "greedy",
        "dsk_moe.router:GreedyRouter",
        config=GreedyConfig,
        summary="plain top-k router without load balancing (ablation)",
    )
