"""The ``fp8`` feature: every :class:`dsk.api.LinearLayers` module computes its projections with FP8 GEMMs.

``transform_model`` walks the model (decoder layers and MTP blocks alike) and gives each module whose projections
run through ``linear_impl`` (attention, the dense FFN, the shared experts, the routed experts) its own
:class:`dsk_fp8.linear.FP8Linear`. What does not run through that seam keeps its precision, as in DeepSeek-V3: the
embedding, the output head, the router gate, the norms and the MTP projection ``eh_proj``.

``after_step`` reports how many GEMMs ran in FP8 during the step (``fp8_gemms``; three per site and micro-batch:
forward, dgrad, wgrad) and per kind of module (``fp8_gemms/attention``, ``/dense_ffn``, ``/shared_experts``,
``/routed_experts``), then resets the count: the proof of coverage in ``metrics.jsonl``.

For ``dsk profile`` (:class:`dsk.api.Profiled`): between ``profile_start`` and ``profile_report`` every training
forward GEMM records its quantisation error (:class:`dsk_fp8.linear.QuantErrors`), and the report gives, per site,
the mean over the measured calls of the output's relative error against the same product in the input's dtype and
of the weight's E4M3 round-trip error, and per layer the largest of its sites'.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from dsk.api import Feature, LinearLayers
from dsk.api.runtime import RunSetupError

from .config import FP8Config
from .linear import FP8Linear, QuantErrors

__all__ = ["FP8Feature", "layer_of", "module_group"]

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


_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(site: str) -> str:
    """The layer a site belongs to: its name up to the first index (``layers.1.mlp.experts.w_down`` ->
    ``layers.1``, ``mtp.layers.0.block.self_attn.o_proj`` -> ``mtp.layers.0``), else its module's name."""
    m = _LAYER.match(site)
    return m.group(1) if m else site.rsplit(".", 1)[0]


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
        #: the quantisation errors recorded between profile_start and profile_report
        self.errors = QuantErrors()
        self._run: Any = None  # the run context (its ``parallel`` gathers the ranks' errors)

    def transform_model(self, model: nn.Module, run: Any) -> None:
        """Set ``linear_impl`` on every LinearLayers module, after checking that the block size divides its Ks."""
        cfg = self.config
        B, key = cfg.block_size, self.name or "fp8"
        if run is not None:
            self._run = run
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
                name, B, cfg.scaling, cfg.pow2_scales, cfg.gemm, counts=self.counts, module=module, errors=self.errors
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

    # -- dsk profile ---------------------------------------------------------------------------------------------
    def profile_start(self) -> None:
        """Record every training forward GEMM's quantisation error from now on."""
        self.errors.clear()
        self.errors.on = True

    def profile_report(self) -> dict[str, Any]:
        """The errors recorded since :meth:`profile_start` (then recording stops), over every rank's calls.

        ``quant_error``: ``{site: {"output_rel_error", "weight_rel_error", "calls"}}``, each error the mean over the
        recorded calls (``||y_fp8 - y_ref||_F / ||y_ref||_F`` with ``y_ref`` the product in the input's dtype;
        ``||dequant(quant(W)) - W||_F / ||W||_F``); ``by_layer``: ``{layer: {"output_rel_error",
        "weight_rel_error"}}``, the largest over the layer's sites. Collective where the run has several ranks:
        each rank's sums go to every rank (:meth:`~dsk.api.ParallelStrategy.broadcast_object` from each in turn),
        so a pipeline's writer reports the sites of every stage, and data-parallel ranks' calls are pooled.
        """
        self.errors.on = False
        sums = self.errors.sums
        values = torch.stack([torch.stack(v[:2]) for v in sums.values()]).tolist() if sums else []  # one host sync
        local = {k: (o, w, v[2]) for (k, v), (o, w) in zip(sums.items(), values, strict=True)}
        self.errors.clear()
        parallel = getattr(self._run, "parallel", None)
        ranks = [local]
        if parallel is not None and parallel.world_size > 1:
            ranks = [parallel.broadcast_object(local, src) for src in range(parallel.world_size)]
        pooled: dict[str, list[float]] = {}
        for part in ranks:
            for site, (o, w, n) in part.items():
                acc = pooled.setdefault(site, [0.0, 0.0, 0])
                acc[0], acc[1], acc[2] = acc[0] + o, acc[1] + w, acc[2] + n
        order = {s: i for i, s in enumerate(self.sites)}
        quant_error = {
            site: {"output_rel_error": o / n, "weight_rel_error": w / n, "calls": n}
            for site, (o, w, n) in sorted(pooled.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
        }
        by_layer: dict[str, dict[str, float]] = {}
        for site, e in quant_error.items():
            layer = by_layer.setdefault(layer_of(site), {"output_rel_error": 0.0, "weight_rel_error": 0.0})
            layer["output_rel_error"] = max(layer["output_rel_error"], e["output_rel_error"])
            layer["weight_rel_error"] = max(layer["weight_rel_error"], e["weight_rel_error"])
        return {"quant_error": quant_error, "by_layer": by_layer}
