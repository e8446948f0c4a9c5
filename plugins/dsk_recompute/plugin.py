"""Hook implementations of dsk_recompute (torch-free, lazy)."""

from __future__ import annotations

from dsk import hookimpl
from dsk_recompute.config import RecomputeConfig


@hookimpl
def register_features(register):
    # after the features that change how a block computes (its recomputation must rerun their ops), before
    # compile (torchtitan applies activation checkpointing, then torch.compile)
    register(
        "feature",
        "recompute",
        "dsk_recompute.recompute:Recompute",
        config=RecomputeConfig,
        after=("fp8", "bf16"),
        before=("compile",),
        summary="activation recomputation per transformer block: selective (DeepSeek-V3's set) or full",
    )
