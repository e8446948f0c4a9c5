"""The ``fp8`` feature: every :class:`dsk.api.LinearLayers` module computes its projections with FP8 GEMMs.

``transform_model`` walks the model (decoder layers and MTP blocks alike) and gives each module whose projections
run through ``linear_impl`` (attention, the dense FFN, the shared experts, the routed experts) its own
:class:`dsk_fp8.linear.FP8Linear`. What does not run through that seam keeps its precision, as in DeepSeek-V3: the
embedding, the output head, the router gate, the norms and the MTP projection ``eh_proj``.

``after_step`` reports how many GEMMs ran in FP8 during the step (``fp8_gemms``; three per site and micro-batch:
forward, dgrad, wgrad) and per kind of module (``fp8_gemms/attention``, ``/dense_ffn``, ``/shared_experts``,
``/routed_experts``), then resets the count: the proof of coverage in ``metrics.jsonl``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import nn

from dsk.api import Feature, LinearLayers
from dsk.api.runtime import RunSetupError

from .config import FP8Config
from .linear import FP8Linear

__all__ = ["FP8Feature", "module_group"]

# the last component of a module's qualified name -> its group in the metrics
_GROUPS = {
    "self_attn": "attention",
    "mlp": "dense_ffn",
    "shared_experts": "shared_experts",
    "experts": "routed_experts",
}


def module_group(qualified_name: str) -> str:
    """The metrics group of a LinearLayers module (``layers.1.mlp.experts`` -> ``routed_experts``)."""
    last = qualified_name.rsplit(".", 1)[-1]
    return _GROUPS.get(last, last)


class FP8Feature(Feature):
    """Installs FP8 GEMMs in every linear-layer site and counts them per step."""

    stages = ("transform_model", "after_step")

    def __init__(self, config: FP8Config | None = None):
        super().__init__(config or FP8Config())
        self.counts: Counter = Counter()
        #: qualified module name -> its metrics group, filled by transform_model
        self.groups: dict[str, str] = {}
        #: qualified site names (``<module>.<site>``) that run in FP8
        self.sites: list[str] = []

    def transform_model(self, model: nn.Module, run: Any) -> None:
        """Set ``linear_impl`` on every LinearLayers module, after checking that the block size divides its Ks."""
        cfg = self.config
        B, key = cfg.block_size, self.name or "fp8"
        for name, module in model.named_modules():
            if not isinstance(module, LinearLayers):
                continue
            for site in module.linear_sites():
                if site.in_features % B:
                    raise RunSetupError(
                        f"features.{key}.block_size = {B} does not divide K = {site.in_features} of "
                        f"{name}.{site.name} (set by model.{site.in_key}); use a block size that divides every K "
                        "(e.g. 32) or change the dim"
                    )
                self.sites.append(f"{name}.{site.name}")
                self.counts[f"{name}.{site.name}"] = 0
            module.linear_impl = FP8Linear(
                name, B, cfg.scaling, cfg.pow2_scales, cfg.gemm, counts=self.counts, module=module
            )
            self.groups[name] = module_group(name)
        return None

    def step_counts(self) -> dict[str, int]:
        """This step's GEMM counts so far: the total and one per module group."""
        out = {"fp8_gemms": sum(self.counts.values())}
        for site, n in self.counts.items():
            group = self.groups.get(site.rsplit(".", 1)[0], "other")
            out[f"fp8_gemms/{group}"] = out.get(f"fp8_gemms/{group}", 0) + n
        return out

    def after_step(self, run: Any, step: int) -> dict[str, float]:
        """The step's FP8 GEMM counts (then reset)."""
        metrics = {k: float(v) for k, v in self.step_counts().items()}
        # zeroed, not cleared: the counter keeps one key per site from transform_model on, so compiled blocks,
        # whose guards check the counter's size, are not recompiled every step
        for site in self.counts:
            self.counts[site] = 0
        return metrics
