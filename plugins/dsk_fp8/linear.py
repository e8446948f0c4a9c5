"""The FP8 :class:`dsk.api.runtime.LinearImpl`: one instance per model component, counting its quantised GEMMs.

``transform_model`` gives every :class:`dsk.api.LinearLayers` module its own :class:`FP8Linear`, which knows the
module's qualified name; each call through it runs :func:`dsk_fp8.gemm.fp8_linear` / :func:`~dsk_fp8.gemm.fp8_grouped`
and counts the GEMMs that ran in FP8 under ``"<module>.<site>"``: one for the forward, one per backward product
(dgrad, wgrad). A forward that runs again for a recomputation (:func:`dsk.api.runtime.recomputing`) is not counted
twice, and a forward of a module in eval mode (evaluation, generation) is not counted at all: the count is the
training step's.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch

from dsk.api.runtime import LinearImpl, recomputing

from .gemm import FP8Recipe, fp8_grouped, fp8_linear, resolve_backend

__all__ = ["FP8Linear"]


class FP8Linear(LinearImpl):
    """FP8 GEMMs for the linear layers of one module.

    Args:
        module_name: the module's qualified name in the model (``layers.1.mlp.experts``).
        block_size, scaling, pow2_scales, gemm: the ``[features.fp8]`` options.
        counts: the shared per-site counter (``"<module>.<site>" -> GEMMs``) the feature reads each step.
        module: the module this impl computes for (held weakly): its ``training`` flag says whether to count.
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
    ):
        self.module_name = module_name
        self._module = weakref.ref(module) if module is not None else None
        self.block_size, self.tensorwise, self.pow2, self.gemm = block_size, scaling == "tensorwise", pow2_scales, gemm
        self.counts: Counter = counts if counts is not None else Counter()
        self._recipes: dict[torch.device, FP8Recipe] = {}

    def _recipe(self, device: torch.device) -> FP8Recipe:
        recipe = self._recipes.get(device)
        if recipe is None:
            backend = resolve_backend(self.gemm, device)
            recipe = self._recipes[device] = FP8Recipe(self.block_size, self.tensorwise, self.pow2, backend)
        return recipe

    def _counter(self, site: str):
        """The callback that counts this call's GEMMs: the forward's when the module trains, the backward's always.

        "Trains" is the module's ``training`` flag (without a module: autograd on), so evaluation and generation
        (``model.eval()``) are not counted, while a training forward run without autograd on purpose (a selectively
        recomputed region's first pass) is. A forward run again for a recomputation (inside
        :func:`dsk.api.runtime.recompute_scope`) does not count its forward GEMM twice.
        """
        module = self._module() if self._module is not None else None
        trains = module.training if module is not None else torch.is_grad_enabled()
        key = f"{self.module_name}.{site}" if self.module_name else site
        counts, forward = self.counts, trains and not recomputing()

        def count(n: int, backward: bool) -> None:
            if backward or forward:
                counts[key] += n

        return count

    def linear(self, x: torch.Tensor, weight: torch.Tensor, site: str) -> torch.Tensor:
        """``x [..., K] @ weight[N, K]^T`` with E4M3 operands in the forward and both backward GEMMs."""
        return fp8_linear(x, weight, self._recipe(x.device), self._counter(site))

    def grouped(self, x_RK: torch.Tensor, weight_ENK: torch.Tensor, load_E: torch.Tensor, site: str) -> torch.Tensor:
        """The experts' grouped GEMM (rows sorted by expert) with E4M3 operands."""
        return fp8_grouped(x_RK, weight_ENK, load_E, self._recipe(x_RK.device), self._counter(site))

    def __repr__(self) -> str:
        scaling = "tensorwise" if self.tensorwise else f"blockwise {self.block_size}"
        return f"FP8Linear({self.module_name!r}, {scaling}, pow2={self.pow2}, gemm={self.gemm!r})"
