"""Config of the MTP heads (torch-free: imported by recipe validation)."""

from __future__ import annotations

from pydantic import Field

from dsk.api import BaseConfig


class MTPConfig(BaseConfig):
    """``[model.mtp] type = "mtp"``: D sequential prediction modules (DeepSeek-V3 §2.2)."""

    depth: int = Field(1, ge=1, description="number D of sequential MTP modules; module k predicts token i+k+1 (V3: 1)")
    loss_weight: float = Field(
        0.3, ge=0, description="lambda in L_MTP = (lambda/D) sum_k L^k (V3: 0.3 for the first 10T tokens, then 0.1)"
    )
