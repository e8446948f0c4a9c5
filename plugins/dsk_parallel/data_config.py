"""Config models of the data-parallel strategies (torch-free).

Each strategy spans every rank of the run (a 1-D DeviceMesh on the default process group); the options are the
few the torch APIs behind them have and that change a run's memory or speed, never its numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from dsk.api import BaseConfig

if TYPE_CHECKING:  # pragma: no cover
    from dsk.api import RunEstimate

__all__ = ["FSDPConfig", "ReplicateConfig", "Zero1Config"]


class ReplicateConfig(BaseConfig):
    """``[parallel.<key>] type = "replicate"``: the whole model on every rank, gradients all-reduced (mean)."""

    bucket_cap_mb: float = Field(
        25.0, gt=0, description="gradients are all-reduced in buckets of this many MiB, overlapped with the backward"
    )

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """Nothing sharded: every rank holds the parameters, gradients and optimizer state
        (:class:`dsk.api.SharesCost`)."""
        estimate.notes["data"] = "replicate: parameters, gradients and optimizer state on every data rank"


class FSDPConfig(BaseConfig):
    """``[parallel.<key>] type = "fsdp"``: parameters, gradients and optimizer state sharded (FSDP2)."""

    reshard_after_forward: bool = Field(
        True,
        description="free each block's gathered parameters after its forward and gather them again for the "
        "backward (less memory, one more all-gather per block); false keeps them until the backward",
    )

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """Parameters, gradients and optimizer state sharded over the data ranks (expert slices stay whole: another
        strategy sharded them). A block's gathered parameters during its forward and backward are not counted
        (:class:`dsk.api.SharesCost`)."""
        dp = estimate.data_ranks
        estimate.param_shards = estimate.grad_shards = estimate.optimizer_shards = dp
        estimate.notes["data"] = f"fsdp: parameters, gradients and optimizer state / {dp} data ranks"


class Zero1Config(BaseConfig):
    """``[parallel.<key>] type = "zero1"``: gradients all-reduced as replicate, optimizer state sharded (ZeRO-1)."""

    bucket_cap_mb: float = Field(
        25.0, gt=0, description="gradients are all-reduced in buckets of this many MiB, overlapped with the backward"
    )

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """The optimizer state sharded over the data ranks (ZeroRedundancyOptimizer assigns whole parameters to
        ranks: the even share is its lower bound); expert slices keep their whole state
        (:class:`dsk.api.SharesCost`)."""
        dp = estimate.data_ranks
        estimate.optimizer_shards = dp
        estimate.notes["data"] = f"zero1: optimizer state / {dp} data ranks (parameters and gradients whole)"
