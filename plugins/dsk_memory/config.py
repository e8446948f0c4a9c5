"""Configs of dsk_memory's features and optimizer (torch-free: imported by ``dsk recipe validate``).

::

    [features.ema]          # an exponential moving average of the weights, in CPU memory
    decay = 0.999

    [features.offload]      # the optimizer state and its update in CPU memory
    enabled = true

    [optimizer]
    type = "adamw_bf16"     # AdamW whose two moments are stored in bfloat16
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from dsk.api import BaseConfig, OptimizerConfig

if TYPE_CHECKING:  # pragma: no cover
    from dsk.api import RunEstimate

__all__ = ["AdamWBF16Config", "EMAConfig", "OffloadConfig"]


class EMAConfig(BaseConfig):
    """Exponential moving average of the parameters, kept in CPU memory as float32 (DeepSeek-V3 §3.3.1)."""

    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay: ema = decay * ema + (1 - decay) * weight")
    update_every: int = Field(
        1,
        ge=1,
        description="update the average after every N-th optimizer step only (fewer device-to-host copies); the "
        "decay is applied per update, so the average spans about N / (1 - decay) steps",
    )

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """An FP32 copy of the rank's parameters in CPU memory; nothing on the device (:class:`dsk.api.SharesCost`)."""
        estimate.cpu_bytes_per_param["ema"] = 4.0
        estimate.notes["ema"] = "ema: an FP32 copy of the rank's parameters in CPU memory (4 B per parameter)"


class OffloadConfig(BaseConfig):
    """Optimizer state in CPU memory: FP32 master weights and the [optimizer]'s state live there, and so does the
    update; each step copies the gradients to the CPU and the updated weights back (one copy each way)."""

    pin_memory: bool = Field(
        True,
        description="on a GPU, stage the copies in pinned (page-locked) CPU buffers so they run asynchronously "
        "(no effect on a CPU run)",
    )

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """The optimizer state and FP32 master copies of the parameters move to CPU memory; the device keeps the
        working parameters and their gradients (:class:`dsk.api.SharesCost`)."""
        estimate.optimizer_on_cpu = True
        estimate.cpu_bytes_per_param["offload master weights"] = 4.0
        estimate.notes["offload"] = (
            "offload: the optimizer state and FP32 master weights (4 B per parameter) in CPU memory"
        )


class AdamWBF16Config(OptimizerConfig):
    """AdamW with its first and second moments stored in bfloat16 (half the state bytes of FP32 moments); the
    update is computed in float32. Same parameter groups as ``adamw``: decay on matrices only."""

    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(
        0.1, ge=0, description="decoupled weight decay of matrices (norm weights and 1-D tensors get none)"
    )

    @model_validator(mode="after")
    def _check_betas(self) -> AdamWBF16Config:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas = {list(self.betas)}: each must be in [0, 1)")
        return self

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """Two BF16 moments per parameter (4 bytes; the FP32 parameters are the master weights). The
        alternative, ``adamw``'s FP32 moments, is 8 bytes (:class:`dsk.api.SharesCost`)."""
        estimate.optimizer_bytes_per_param = 4.0
        estimate.optimizer_alternatives["adamw"] = 8.0
        estimate.notes["optimizer"] = (
            "adamw_bf16: two BF16 moments, 4 B per parameter; the FP32 parameters are the master weights"
        )
