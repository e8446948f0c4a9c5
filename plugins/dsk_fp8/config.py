"""Config of the ``fp8`` feature (torch-free: imported by ``dsk recipe validate``).

::

    [features.fp8]
    block_size = 128          # B: 1 x B activation tiles, B x B weight blocks, FP32 promotion every B products
    scaling = "blockwise"     # or "tensorwise": one scale per tensor (the baseline)
    pow2_scales = false       # round every scale up to a power of two
    gemm = "auto"             # "scaled_mm" (rowwise torch._scaled_mm per K chunk) or "dequant" (exact emulation)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dsk.api import BaseConfig

__all__ = ["FP8Config"]


class FP8Config(BaseConfig):
    """FP8 (E4M3) GEMMs with fine-grained scaling for every linear layer of attention and the experts."""

    block_size: int = Field(
        128,
        description="tile width B: activations per 1 x B tiles, weights per B x B blocks, the weight-gradient "
        "inputs per B x 1 tiles, FP32 promotion every B elements of K; must divide every K of the model "
        "(DeepSeek-V3: 128; 32 fits the quickstart's small dims)",
    )
    scaling: Literal["blockwise", "tensorwise"] = Field(
        "blockwise", description="tile/block scales (DeepSeek-V3) or one scale per tensor (the baseline)"
    )
    pow2_scales: bool = Field(False, description="round every scale up to a power of two (2^ceil(log2(amax/448)))")
    gemm: Literal["auto", "scaled_mm", "dequant"] = Field(
        "auto",
        description="GEMM back end: one rowwise torch._scaled_mm per B-wide K chunk summed in FP32, or the FP8 "
        "values times their scales as FP32 then one FP32 GEMM (same operands); auto = scaled_mm on CUDA sm89+, "
        "dequant elsewhere (faster on CPU)",
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 8 or v & (v - 1):
            raise ValueError(f"block_size = {v}: must be a power of two >= 8 (DeepSeek-V3 uses 128)")
        return v
