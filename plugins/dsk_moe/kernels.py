"""CPU kernels of the MoE layer (``csrc/experts.cpp``, ``csrc/routing.cpp``): routed experts and routing.

* :func:`routed_experts`: the routed experts of a DeepSeekMoE layer. On CPU they are many small GEMMs; ATen runs
  them one after another and splits each over the threads, where CPU BLAS is least efficient. The kernel splits
  the *experts* over the threads instead, runs each expert's GEMMs on its thread with the SwiGLU fused in
  between, and gathers / combines the token rows itself (``bench/bench_moe.py`` measures the gain).
* :func:`route_topk`: the router's group-limited top-k and the sort of the routed slots by expert, one pass over
  the tokens where the PyTorch path takes ~15 small kernels (bias add, group scores, two topk, masks, argsort).
* :func:`route_weights`: the routing weights and the sequence-wise balance loss in one pass each way.

The routed-expert forward is also an operator of the torch dispatcher, ``torch.ops.dsk_moe.experts_forward``, which
the autograd node calls: a dispatch mode (selective recomputation, the saved-activation measure) then sees the
whole kernel as one op whose outputs it can keep, instead of the allocations inside it. A no-grad call (eval,
generation) calls the kernel directly and skips the dispatcher's few microseconds.

All three run on plain float32/float64 CPU tensors (``cpu_kernel_supports``) once :data:`EXTENSION` has built;
the callers (:mod:`dsk_moe.experts`, :mod:`dsk_moe.router`, :mod:`dsk_moe.moe`) check both and otherwise run
their PyTorch paths, which the kernels are tested against. GEMMs go through ATen (``dsk/csrc/dsk_gemm.h``).

Shape suffixes as in :mod:`dsk_moe.moe`: N tokens, D model dim, H expert hidden width, E experts, K slots per
token, R routed slots.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsk.api.runtime import CppExtension

__all__ = ["EXTENSION", "routed_experts", "experts_cpu", "route_topk", "route_weights"]

_CSRC = Path(__file__).parent / "csrc"

#: The MoE kernels; ``EXTENSION.load()`` is the module, or None where they cannot build or run.
EXTENSION = CppExtension("dsk_moe_kernels", [_CSRC / "experts.cpp", _CSRC / "routing.cpp"])


def _module():
    return EXTENSION.load()


# FRAGMENT, not DEF: another library may add ops to the namespace; the handle lives as long as the module.
_LIB = torch.library.Library("dsk_moe", "FRAGMENT")
_LIB.define(
    "experts_forward(Tensor x, Tensor order, Tensor starts, int k, Tensor weight, Tensor w_gate, Tensor w_up, "
    "Tensor w_down) -> (Tensor, Tensor)"
)
_LIB.impl(
    "experts_forward",
    lambda x, order, starts, k, weight, w_gate, w_up, w_down: tuple(
        _module().experts_forward(x, order, starts, k, weight, w_gate, w_up, w_down)
    ),
    "CPU",
)


class _RoutedExperts(torch.autograd.Function):
    """The kernel as an autograd node; the backward recomputes the activation from the saved pre-activations."""

    @staticmethod
    def forward(ctx, x_ND, weight_S, w_gate, w_up, w_down, order_R, starts_E1, k):  # type: ignore[override]
        # through the dispatcher, so that selective recomputation keeps (y, gu) instead of rerunning the kernel
        y_ND, gu_R2H = torch.ops.dsk_moe.experts_forward(x_ND, order_R, starts_E1, k, weight_S, w_gate, w_up, w_down)
        ctx.save_for_backward(x_ND, weight_S, w_gate, w_up, w_down, order_R, starts_E1, gu_R2H)
        ctx.k = k
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_ND):  # type: ignore[override]
        x_ND, weight_S, w_gate, w_up, w_down, order_R, starts_E1, gu_R2H = ctx.saved_tensors
        dx, dw_gate, dw_up, dw_down, dweight = _module().experts_backward(
            dy_ND.contiguous(), x_ND, gu_R2H, order_R, starts_E1, ctx.k, weight_S, w_gate, w_up, w_down
        )
        return dx, (dweight if weight_S.numel() else None), dw_gate, dw_up, dw_down, None, None, None


def routed_experts(
    x_ND: torch.Tensor,
    weights_NK: torch.Tensor | None,
    order_R: torch.Tensor,
    load_E: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """The routed part of a MoE layer: ``y[n] = sum_k weight[n, k] * expert_{idx[n, k]}(x[n])``, via the kernel.

    Args:
        x_ND: tokens [N, D].
        weights_NK: routing weights [N, K] (or None: weight 1); differentiable.
        order_R: the R routed slots (slot = n * K + k) sorted by expert; expert e owns the next ``load_E[e]``.
        load_E: slots per expert [E].
        w_gate, w_up: [E, H, D]; w_down: [E, D, H] (as :class:`dsk_moe.experts.RoutedExperts` stores them).
        k: slots per token K.

    Returns:
        y [N, D]; differentiable in x, the routing weights and the expert weights. The caller has checked
        ``cpu_kernel_supports`` and that ``EXTENSION.load()`` is not None.
    """
    starts_E1 = torch.zeros(load_E.numel() + 1, dtype=torch.long)
    torch.cumsum(load_E.to(torch.long), dim=0, out=starts_E1[1:])
    weight_S = weights_NK.reshape(-1).contiguous() if weights_NK is not None else x_ND.new_empty(0)
    weights = (w_gate.contiguous(), w_up.contiguous(), w_down.contiguous())
    x_ND, order_R = x_ND.contiguous(), order_R.to(torch.long).contiguous()
    if not torch.is_grad_enabled() or not (
        x_ND.requires_grad or weight_S.requires_grad or any(w.requires_grad for w in weights)
    ):
        return _module().experts_forward(x_ND, order_R, starts_E1, k, weight_S, *weights)[0]
    return _RoutedExperts.apply(x_ND, weight_S, *weights, order_R, starts_E1, k)


def experts_cpu(
    x_RD: torch.Tensor,
    load_E: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    scale_R: torch.Tensor | None,
) -> torch.Tensor:
    """``(silu(x Wg_e^T) * x Wu_e^T * scale) Wd_e^T`` on rows already sorted by expert (:meth:`RoutedExperts.forward`).

    x [R, D] with expert e owning the next ``load_E[e]`` rows, scale [R] or None; returns [R, D] in the same order.
    """
    order_R = torch.arange(x_RD.shape[0])
    scale = scale_R.unsqueeze(-1) if scale_R is not None else None
    return routed_experts(x_RD, scale, order_R, load_E, w_gate, w_up, w_down, k=1)


def route_topk(
    scores_NE: torch.Tensor,
    bias_E: torch.Tensor | None,
    n_groups: int,
    topk_groups: int,
    top_k: int,
    top2_sum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-limited top-k of ``scores + bias`` and the stable counting sort of the slots by expert.

    Per token, with ``n_groups > 1``: the ``topk_groups`` groups of highest score (sum of the group's two best, or
    its best) are kept; then the ``top_k`` best experts among them, best first (ties: lower index first).
    Returns ``idx [N, K]`` (long), ``order [N * K]`` (slots ``n * K + k`` sorted by expert, stable, i.e.
    ``argsort(idx.flatten(), stable=True)``) and ``load [E]`` (long). No gradient.
    """
    bias = bias_E.float().contiguous() if bias_E is not None else scores_NE.new_empty(0, dtype=torch.float32)
    return tuple(  # type: ignore[return-value]
        _module().route_topk(scores_NE.detach().contiguous(), bias, n_groups, topk_groups, top_k, top2_sum)
    )


class _RouteWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, idx, norm, scale, alpha, n_seqs, seq_len):  # type: ignore[override]
        w, loss, den, inv_sum, f = _module().route_weights_forward(scores, idx, norm, scale, alpha, n_seqs, seq_len)
        ctx.save_for_backward(scores, idx, den, inv_sum, f)
        ctx.args = (norm, scale, alpha, n_seqs, seq_len)
        return w, loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dw, dloss):  # type: ignore[override]
        scores, idx, den, inv_sum, f = ctx.saved_tensors
        dw = dw.contiguous() if dw is not None else torch.zeros(idx.shape, dtype=scores.dtype)
        dloss = dloss if dloss is not None else torch.zeros((), dtype=scores.dtype)
        ds = _module().route_weights_backward(dw, dloss, scores, idx, den, inv_sum, f, *ctx.args)
        return ds, None, None, None, None, None, None


def route_weights(
    scores_NE: torch.Tensor,
    idx_NK: torch.Tensor,
    norm: bool,
    scale: float,
    seq_alpha: float = 0.0,
    seq_shape: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Routing weights of the selected experts and, with ``seq_alpha > 0``, the sequence-wise balance loss.

    ``w = scale * s[idx]`` (divided by ``sum_k s[idx] + 1e-20`` when ``norm``); the loss is DeepSeek-V3's
    complementary sequence-wise loss over ``seq_shape = (B, T)`` (default: one sequence of N tokens), as
    ``NoauxTCRouter.compute_balance_loss`` defines it. Differentiable in the scores.
    """
    n_seqs, seq_len = seq_shape if seq_shape is not None else (1, scores_NE.shape[0])
    args = (scores_NE.contiguous(), idx_NK.contiguous(), norm, float(scale), float(seq_alpha), n_seqs, seq_len)
    if torch.is_grad_enabled() and scores_NE.requires_grad:
        w, loss = _RouteWeights.apply(*args)
    else:
        w, loss = _module().route_weights_forward(*args)[:2]
    return w, (loss if seq_alpha > 0 else None)
