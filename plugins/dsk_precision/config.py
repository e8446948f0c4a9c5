"""Configs of the precision features (torch-free; validated when a recipe loads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsk.api import BaseConfig

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
