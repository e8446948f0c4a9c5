"""Options of the ``recompute`` feature (``[features.recompute]``). Torch-free: ``dsk recipe validate`` imports it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from dsk.api import BaseConfig

if TYPE_CHECKING:  # pragma: no cover
    from dsk.api import RunEstimate

__all__ = ["DEFAULT_REGIONS", "RecomputeConfig"]

#: what DeepSeek-V3 recomputes in the backward (report §3.2.3): RMSNorm, the MLA up-projections, the SwiGLU
#: activation; plus the MoE's token gather before the routed experts (``ffn.dispatch``: a copy of N * K rows, as
#: cheap to redo as the activation, and as large as two norm outputs). The names are the regions the components
#: mark (dsk.api.runtime.recomputable / region)
DEFAULT_REGIONS: tuple[str, ...] = ("norm", "attention.up_projection", "ffn.activation", "ffn.dispatch")


class RecomputeConfig(BaseConfig):
    """``[features.recompute]``: which activations each transformer block drops in the forward and recomputes.

    ``full`` keeps only each block's input and reruns the whole block in the backward. ``selective`` keeps the
    outputs of the heavy ops (GEMMs, attention, the C++ kernels) and recomputes the ops run inside ``regions``
    and the cheap element-wise ops between the heavy ones.
    """

    mode: Literal["selective", "full"] = Field(
        "selective", description="selective: DeepSeek-V3's recompute set; full: rerun every block in the backward"
    )
    method: Literal["regions", "sac"] = Field(
        "regions",
        description="selective only: regions = keep each recomputable region's inputs and recompute its outputs "
        "in the backward (saved-tensor hooks); sac = torch's selective-checkpoint contexts over the whole block",
    )
    regions: list[str] | None = Field(
        None,
        description="selective only: the regions whose ops, GEMMs included, are recomputed "
        f"(default {list(DEFAULT_REGIONS)})",
    )

    @field_validator("regions")
    @classmethod
    def _regions_named(cls, regions: list[str] | None) -> list[str] | None:
        if regions is not None:
            bad = [r for r in regions if not isinstance(r, str) or not r.strip()]
            if bad:
                raise ValueError(
                    f"regions = {regions!r}: every region is a non-empty name, e.g. {DEFAULT_REGIONS[0]!r}"
                )
        return regions

    @model_validator(mode="after")
    def _regions_need_selective(self) -> RecomputeConfig:
        if self.regions is not None and self.mode != "selective":
            raise ValueError(
                f"regions = {self.regions!r} is an option of mode = 'selective', not mode = {self.mode!r} "
                "(full recomputation reruns every op of the block)"
            )
        return self

    def recompute_regions(self) -> tuple[str, ...]:
        """The regions selective mode recomputes."""
        return tuple(self.regions) if self.regions is not None else DEFAULT_REGIONS

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """Selective: every transformer block drops what its recomputed regions free; full: each block keeps its
        input only (:class:`dsk.api.SharesCost`). The one block whose forward the backward reruns at a time is not
        counted (a transient of the backward)."""
        estimate.recompute = self.mode
        estimate.recomputed_regions = frozenset(self.recompute_regions()) if self.mode == "selective" else None
        what = f"regions {', '.join(self.recompute_regions())}" if self.mode == "selective" else "block inputs kept"
        estimate.notes["recompute"] = f"recompute: {self.mode} ({what})"
