"""Configs of the precision features (torch-free; validated when a recipe loads)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from dsk.api import BaseConfig

if TYPE_CHECKING:  # pragma: no cover
    from dsk.api import RunEstimate

__all__ = ["BF16Config", "CompileConfig"]


class BF16Config(BaseConfig):
    """BF16 mixed precision: BF16 compute under autocast, FP32 master weights, gradients and optimizer."""

    reduce_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype in which a sharding strategy reduces gradients across ranks (the FSDP2 policy's "
        "reduce_dtype); float32 as DeepSeek-V3",
    )
    cache_casts: bool = Field(
        True,
        description="autocast keeps each weight's BF16 copy for the whole forward (cast once, not once per use); "
        "false saves that memory at the cost of recasting",
    )

    #: the activation dtype is read by the other shares (a strategy's message sizes): set it first
    cost_share_phase: ClassVar[int] = -1

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """Activations at 2 bytes (BF16) instead of FP32's 4; parameters, gradients and the optimizer stay FP32
        (:class:`dsk.api.SharesCost`)."""
        estimate.act_bytes = 2.0
        estimate.notes["bf16"] = (
            "bf16: saved activations at 2 B per value (float32 statistics stay 4 B); FP32 parameters and gradients"
            + ("; autocast's cached BF16 weight copies are not counted" if self.cache_casts else "")
        )


class CompileConfig(BaseConfig):
    """torch.compile applied to each transformer block (model layers and MTP blocks), as torchtitan does."""

    backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor",
        description="torch.compile backend: inductor generates fused kernels; aot_eager traces forward and backward "
        "without code generation; eager only captures graphs (for debugging)",
    )
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode (reduce-overhead and max-autotune use CUDA graphs on a GPU)"
    )
    fullgraph: bool = Field(
        False, description="fail on any graph break inside a block instead of splitting the block's graph"
    )
    dynamic: bool | None = Field(
        None,
        description="dynamic shapes: true traces symbolic sizes at once, false specialises on every new size, unset "
        "lets torch mark a size dynamic after it changes once",
    )
