"""The linear-layer seam: how a model component computes the products of its projections.

A component that owns projection weights (attention, FFN, experts) computes them through its ``linear_impl``, a
:class:`LinearImpl`, instead of calling ``F.linear`` itself, and lists them in ``linear_sites()`` (the
:class:`dsk.api.LinearLayers` protocol). The default, :data:`PLAIN`, is ``F.linear``, and for stacked expert weights
it lets the component take its own grouped path (its kernels). A feature swaps the implementation from outside
(``module.linear_impl = impl`` in ``transform_model``): FP8 GEMMs with fine-grained scaling are one such
implementation. What a component does *not* route through it (a router's gate, the output head, the embedding,
a projection between heads) keeps its precision whatever the feature.

A site's name is the component's own (a projection's name, or a name for a concatenated GEMM), so an
implementation can count, log or skip sites by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PLAIN", "LinearImpl", "LinearSite"]


@dataclass(frozen=True)
class LinearSite:
    """One GEMM of a component as ``linear_sites()`` lists it.

    Attributes:
        name: the site name the component passes to its implementation.
        out_features: N (the output width; for stacked experts, per expert).
        in_features: K (the reduction length of the forward GEMM).
        in_key: the config key that sets K, relative to the model table (``"dim"``, or a component's key such as
            ``"ffn.expert_hidden_dim"``), for error messages.
        grouped: stacked expert weights ``[E, N, K]`` run over expert-sorted rows.
        n_groups: E for a grouped site, else 1.
    """

    name: str
    out_features: int
    in_features: int
    in_key: str
    grouped: bool = False
    n_groups: int = 1


class LinearImpl:
    """The products of a component's linear layers. Subclass it and override :meth:`linear` / :meth:`grouped`.

    The base class is plain PyTorch (:data:`PLAIN`): ``F.linear`` for a dense site and ``None`` (the component's
    own grouped path, e.g. its CPU kernel) for stacked experts.
    """

    name = "plain"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, site: str) -> torch.Tensor:
        """``x [..., K] @ weight[N, K]^T -> [..., N]`` (``F.linear`` without bias); differentiable in both."""
        return F.linear(x, weight)

    def grouped(
        self, x_RK: torch.Tensor, weight_ENK: torch.Tensor, load_E: torch.Tensor, site: str
    ) -> torch.Tensor | None:
        """``y[r] = x[r] @ weight[e(r)]^T`` over rows sorted by expert (expert e owns the next ``load_E[e]`` rows).

        Returns ``[R, N]``, or None to let the component run its own grouped path (the default).
        """
        return None

    @property
    def replaces_grouped(self) -> bool:
        """Whether :meth:`grouped` is overridden (then a component must not take a fused kernel that skips it)."""
        return type(self).grouped is not LinearImpl.grouped


#: the default implementation: plain PyTorch, the components' own grouped kernels
PLAIN = LinearImpl()
