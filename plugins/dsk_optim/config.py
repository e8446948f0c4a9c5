"""Config of the built-in optimizer (torch-free: imported by ``dsk recipe validate``).

``[optimizer] type = "adamw"`` (the default when the table is absent); the schedule and clipping options are the
ones every optimizer has (:class:`dsk.api.OptimizerConfig`)::

    [optimizer]
    lr = 3e-3
    min_lr = 3e-4
    warmup_steps = 30
    weight_decay = 0.1
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from dsk.api import OptimizerConfig

if TYPE_CHECKING:  # pragma: no cover
    from dsk.api import RunEstimate

__all__ = ["AdamWConfig"]


class AdamWConfig(OptimizerConfig):
    """AdamW with decoupled weight decay on matrices only (norm weights and other 1-D tensors get none)."""

    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(
        0.1, ge=0, description="decoupled weight decay of matrices (norm weights and 1-D tensors get none)"
    )
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = Field(
        "auto",
        description="torch's kernel: fused (one pass per tensor), foreach (batched ops) or for-loop; auto takes fused "
        "where the parameters allow it (all float, all on CPU or all on CUDA), else torch's default",
    )

    @model_validator(mode="after")
    def _check_betas(self) -> AdamWConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas = {list(self.betas)}: each must be in [0, 1)")
        return self

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """Two FP32 moments per parameter (8 bytes); dsk's parameters are FP32, so they are the master weights
        (no extra copy). The alternative, ``adamw_bf16``'s BF16 moments, is 4 bytes (:class:`dsk.api.SharesCost`)."""
        estimate.optimizer_bytes_per_param = 8.0
        estimate.optimizer_alternatives["adamw_bf16"] = 4.0
        estimate.notes["optimizer"] = (
            "adamw: two FP32 moments, 8 B per parameter; the FP32 parameters are the master weights"
        )
