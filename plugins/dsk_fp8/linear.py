"""The FP8 :class:`dsk.api.runtime.LinearImpl`: one instance per model component, counting its quantised GEMMs.

``transform_model`` gives every :class:`dsk.api.LinearLayers` module its own :class:`FP8Linear`, which knows the
module's qualified name; each call through it runs :func:`dsk_fp8.gemm.fp8_linear` / :func:`~dsk_fp8.gemm.fp8_grouped`
and counts the GEMMs that ran in FP8 under ``"<module>.<site>"``: one for the forward, one per backward product
(dgrad, wgrad). A forward that runs again for a recomputation (:func:`dsk.api.runtime.recomputing`) is not counted
twice, and a forward of a module in eval mode (evaluation, generation) is not counted at all: the count is the
training step's.

While ``dsk profile`` measures (:class:`QuantErrors` switched on by the feature's ``profile_start``), each training
forward also records its quantisation error: the FP8 output against the same product in the input's dtype, and the
weight's own E4M3 round trip. Switched off, the only cost is one attribute test per call.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import torch

from dsk.api.runtime import LinearImpl, profile_part, recomputing

from .gemm import FP8Recipe, fp8_grouped, fp8_linear, grouped_mm_ok, resolve_backend

__all__ = ["FP8Linear", "QuantErrors", "reference_rows"]


def reference_rows(x_RK: torch.Tensor, w_ENK: torch.Tensor, load_E: torch.Tensor) -> torch.Tensor:
    """``y[r] = x[r] @ W[e(r)]^T`` in ``x``'s dtype, no FP8: what the layer computes without the feature.

    The weight is cast to the input's dtype first, as ``torch.autocast`` casts both operands of a plain linear.
    """
    w_ENK = w_ENK.to(x_RK.dtype)
    if w_ENK.shape[0] == 1:
        return x_RK @ w_ENK[0].t()
    if grouped_mm_ok(x_RK, w_ENK):
        return torch._grouped_mm(x_RK, w_ENK.transpose(-2, -1), offs=torch.cumsum(load_E, dim=0, dtype=torch.int32))
    parts = [x @ w.t() for x, w in zip(x_RK.split(load_E.tolist()), w_ENK.unbind(0), strict=True)]
    return torch.cat(parts) if parts else x_RK.new_zeros(0, w_ENK.shape[1])


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||diff||_F / ||ref||_F`` in float32 (0 for an all-zero reference and difference)."""
    return torch.linalg.vector_norm(diff.float()) / torch.linalg.vector_norm(ref.float()).clamp_min(1e-30)


class QuantErrors:
    """The per-site quantisation errors of the training forwards while :attr:`on` (shared by a model's impls).

    Per ``"<module>.<site>"``: the sums over the recorded calls of the output's relative error
    ``||y_fp8 - y_ref||_F / ||y_ref||_F`` (``y_ref``: :func:`reference_rows` on the same inputs) and of the
    weight's ``||dequant(quant(W)) - W||_F / ||W||_F`` (the blocks the forward GEMM quantises), as tensors on the
    compute device (no host sync in the forward), and the number of calls.
    """

    def __init__(self) -> None:
        self.on = False
        self.sums: dict[str, list[Any]] = {}  # site -> [output error sum, weight error sum, calls]

    def clear(self) -> None:
        self.sums = {}

    def record(
        self, key: str, x_RK: torch.Tensor, w_ENK: torch.Tensor, load_E: torch.Tensor, y_RN: torch.Tensor, recipe
    ) -> None:
        """Add one forward GEMM's errors: input ``x_RK``, weight ``w_ENK``, FP8 output ``y_RN``."""
        if x_RK.shape[0] == 0:  # no rows (an expert shard that got no tokens): no product to compare
            return
        # its own part of dsk profile's time table: the reference GEMM is the profiler's cost, not the layer's
        with profile_part("fp8_error_recording"), torch.no_grad(), torch.autocast(x_RK.device.type, enabled=False):
            x_RK, w_ENK, y_RN = x_RK.detach(), w_ENK.detach(), y_RN.detach()
            ref_RN = reference_rows(x_RK, w_ENK, load_E)
            out = _rel(y_RN.float() - ref_RN.float(), ref_RN)
            w = w_ENK.float()
            weight = _rel(recipe.weight(w).dequantize() - w, w)
        entry = self.sums.get(key)
        if entry is None:
            self.sums[key] = [out, weight, 1]
        else:
            entry[0], entry[1], entry[2] = entry[0] + out, entry[1] + weight, entry[2] + 1


class FP8Linear(LinearImpl):
    """FP8 GEMMs for the linear layers of one module.

    Args:
        module_name: the module's qualified name in the model (``layers.1.mlp.experts``).
        block_size, scaling, pow2_scales, gemm: the ``[features.fp8]`` options.
        counts: the shared per-site counter (``"<module>.<site>" -> GEMMs``) the feature reads each step.
        module: the module this impl computes for (held weakly): its ``training`` flag says whether to count.
        errors: the shared recorder of quantisation errors (:class:`QuantErrors`), or None.
    """

    name = "fp8"

    def __init__(
        self,
        module_name: str,
        block_size: int = 128,
        scaling: str = "blockwise",
        pow2_scales: bool = False,
        gemm: str = "auto",
        counts: Counter | None = None,
        module: torch.nn.Module | None = None,
        errors: QuantErrors | None = None,
    ):
        self.module_name = module_name
        self._module = weakref.ref(module) if module is not None else None
        self.block_size, self.tensorwise, self.pow2, self.gemm = block_size, scaling == "tensorwise", pow2_scales, gemm
        self.counts: Counter = counts if counts is not None else Counter()
        self.errors = errors
        self._recipes: dict[torch.device, FP8Recipe] = {}

    def _recipe(self, device: torch.device) -> FP8Recipe:
        recipe = self._recipes.get(device)
        if recipe is None:
            backend = resolve_backend(self.gemm, device)
            recipe = self._recipes[device] = FP8Recipe(self.block_size, self.tensorwise, self.pow2, backend)
        return recipe

    def _counts_forward(self) -> bool:
        """Whether this call is a training step's own forward (counted and, while profiling, recorded).

        "Training" is the module's ``training`` flag (without a module: autograd on), so evaluation and generation
        (``model.eval()``) do not count, while a training forward run without autograd on purpose (a selectively
        recomputed region's first pass) does. A forward run again for a recomputation (inside
        :func:`dsk.api.runtime.recompute_scope`) does not count twice.
        """
        module = self._module() if self._module is not None else None
        trains = module.training if module is not None else torch.is_grad_enabled()
        return trains and not recomputing()

    def _key(self, site: str) -> str:
        return f"{self.module_name}.{site}" if self.module_name else site

    def _counter(self, site: str, forward: bool):
        """The callback that counts this call's GEMMs: the forward's when ``forward``, the backward's always."""
        key, counts = self._key(site), self.counts

        def count(n: int, backward: bool) -> None:
            if backward or forward:
                counts[key] += n

        return count

    def linear(self, x: torch.Tensor, weight: torch.Tensor, site: str) -> torch.Tensor:
        """``x [..., K] @ weight[N, K]^T`` with E4M3 operands in the forward and both backward GEMMs."""
        recipe, forward = self._recipe(x.device), self._counts_forward()
        y = fp8_linear(x, weight, recipe, self._counter(site, forward))
        if self.errors is not None and self.errors.on and forward:
            x_RK = x.reshape(-1, x.shape[-1])
            load_E = torch.tensor([x_RK.shape[0]], dtype=torch.long, device=x.device)
            self.errors.record(self._key(site), x_RK, weight.unsqueeze(0), load_E, y.reshape(-1, y.shape[-1]), recipe)
        return y

    def grouped(self, x_RK: torch.Tensor, weight_ENK: torch.Tensor, load_E: torch.Tensor, site: str) -> torch.Tensor:
        """The experts' grouped GEMM (rows sorted by expert) with E4M3 operands."""
        recipe, forward = self._recipe(x_RK.device), self._counts_forward()
        y_RN = fp8_grouped(x_RK, weight_ENK, load_E, recipe, self._counter(site, forward))
        if self.errors is not None and self.errors.on and forward:
            self.errors.record(self._key(site), x_RK, weight_ENK, load_E.to(torch.long), y_RN, recipe)
        return y_RN

    def __repr__(self) -> str:
        scaling = "tensorwise" if self.tensorwise else f"blockwise {self.block_size}"
        return f"FP8Linear({self.module_name!r}, {scaling}, pow2={self.pow2}, gemm={self.gemm!r})"
