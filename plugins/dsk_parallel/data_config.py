"""Config models of the data-parallel strategies (torch-free).

Each strategy spans every rank of the run (a 1-D DeviceMesh on the default process group); the options are the
few the torch APIs behind them have and that change a run's memory or speed, never its numbers.
"""

from __future__ import annotations

from pydantic import Field

from dsk.api import BaseConfig

__all__ = ["FSDPConfig", "ReplicateConfig", "Zero1Config"]


class ReplicateConfig(BaseConfig):
    """``[parallel.<key>] type = "replicate"``: the whole model on every rank, gradients all-reduced (mean)."""

    bucket_cap_mb: float = Field(
        25.0, gt=0, description="gradients are all-reduced in buckets of this many MiB, overlapped with the backward"
    )


class FSDPConfig(BaseConfig):
    """``[parallel.<key>] type = "fsdp"``: parameters, gradients and optimizer state sharded (FSDP2)."""

    reshard_after_forward: bool = Field(
        True,
        description="free each block's gathered parameters after its forward and gather them again for the "
        "backward (less memory, one more all-gather per block); false keeps them until the backward",
    )


class Zero1Config(BaseConfig):
    """``[parallel.<key>] type = "zero1"``: gradients all-reduced as replicate, optimizer state sharded (ZeRO-1)."""

    bucket_cap_mb: float = Field(
        25.0, gt=0, description="gradients are all-reduced in buckets of this many MiB, overlapped with the backward"
    )
