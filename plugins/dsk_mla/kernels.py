"""MLA's CPU attention kernel (``csrc/attention.cpp``): the causal attention core for short sequences.

One (batch, head) per task with its scores in cache, the rope key shared by the heads (no concatenation, no
per-head copy), operands read through their strides and the output written in the layout the output projection
reads. Its GEMMs are tiny (e.g. 64 x 64 x 16), so those of at most 2^18 multiply-adds run in the small
register-blocked GEMM of ``dsk/csrc/dsk_gemm.h`` (ATen's per-call cost, ~4 us, would dominate them) and larger ones
through ATen's ``at::cpu::mm_out``. :class:`dsk_mla.mla.MLA` takes it for plain float32/float64
CPU tensors once :data:`EXTENSION` has built, and otherwise runs its PyTorch path, which the kernel is tested
against.

:func:`absorbed_decode` is the absorbed path's attention over a latent cache for a few queries per row (decoding,
a speculative verify), without autograd: one call where the PyTorch path makes a dozen dispatches per layer and
step.

The forward is also an operator of the torch dispatcher, ``torch.ops.dsk_mla.attention_forward``, which the
autograd node calls: a dispatch mode (selective recomputation, the saved-activation measure) then sees the kernel as
one op whose outputs it can keep. A no-grad call (eval, generation) calls the kernel directly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsk.api.runtime import CppExtension

__all__ = ["EXTENSION", "absorbed_decode", "mla_attention"]

#: The MLA attention kernel; ``EXTENSION.load()`` is the module, or None where it cannot build or run.
EXTENSION = CppExtension("dsk_mla_kernels", [Path(__file__).parent / "csrc" / "attention.cpp"])


# FRAGMENT, not DEF: another library may add ops to the namespace; the handle lives as long as the module.
_LIB = torch.library.Library("dsk_mla", "FRAGMENT")
_LIB.define(
    "attention_forward(Tensor q_nope, Tensor q_pe, Tensor k_nope, Tensor k_pe, Tensor v, float scale) "
    "-> (Tensor, Tensor)"
)
_LIB.impl(
    "attention_forward",
    lambda q_nope, q_pe, k_nope, k_pe, v, scale: tuple(
        EXTENSION.load().mla_attention_forward(q_nope, q_pe, k_nope, k_pe, v, scale)
    ),
    "CPU",
)


class _MLAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_nope, q_pe, k_nope, k_pe, v, scale):  # type: ignore[override]
        # through the dispatcher, so that selective recomputation keeps (o, probs) instead of rerunning the kernel
        o, probs = torch.ops.dsk_mla.attention_forward(q_nope, q_pe, k_nope, k_pe, v, scale)
        ctx.save_for_backward(q_nope, q_pe, k_nope, k_pe, v, probs)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):  # type: ignore[override]
        q_nope, q_pe, k_nope, k_pe, v, probs = ctx.saved_tensors
        grads = EXTENSION.load().mla_attention_backward(
            do.contiguous(), q_nope, q_pe, k_nope, k_pe, v, probs, ctx.scale
        )
        return (*grads, None)


def mla_attention(
    q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal MLA attention over one sequence block: ``q_nope, k_nope [B, T, H, dn], q_pe [B, T, H, dr], k_pe [B, T,
    dr]`` (the rope key shared by the heads), ``v [B, T, H, dv]`` -> ``o [B, T, H, dv]``; differentiable.

    Scores ``scale * (q_nope . k_nope + q_pe . k_pe)`` over keys ``s <= t``. Operands may be strided views (last
    dim contiguous). Keeps the [B, H, T, T] probabilities for the backward: meant for short sequences (the MLA layer
    uses it up to T = 512). The caller has checked ``cpu_kernel_supports`` and that ``EXTENSION.load()`` is not None.
    """
    # BLAS reads each (batch, head) block as a row-major matrix: contiguous rows, rows that do not overlap
    args = [
        t if t.stride(-1) == 1 and t.stride(1) >= t.shape[-1] else t.contiguous()
        for t in (q_nope, q_pe, k_nope, k_pe, v)
    ]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in args):
        return EXTENSION.load().mla_attention_forward(*args, scale)[0]
    return _MLAAttention.apply(*args, scale)


def absorbed_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    w_kv_b: torch.Tensor,
    mask: torch.Tensor | None,
    offset: int,
    scale: float,
) -> torch.Tensor:
    """MLA's absorbed attention over a latent cache, no autograd: ``q_nope [B, T, H, dn], q_pe [B, T, H, dr]``,
    ``kv [B, S, c + dr]`` (the cache's view: normalised latent, then the rope key), ``w_kv_b [H * (dn + dv), c]``
    (``kv_b_proj.weight``: W_UK and W_UV stacked per head) -> ``o [B, T, H, dv]``.

    Query t of row b sees key s where ``mask[b, t, s]`` (bool [B, T, S]) or, with ``mask`` None, where
    ``s <= offset + t``. Equal to :meth:`dsk_mla.mla.MLA._attend_absorbed`'s PyTorch path (tested against it); one
    call instead of its dozen dispatches, which cost more than the products in a decode step. The caller has
    checked ``cpu_kernel_supports`` and that ``EXTENSION.load()`` is not None; operands may be strided views with a
    contiguous last dim.
    """
    return EXTENSION.load().mla_absorbed_decode(q_nope, q_pe, kv, w_kv_b, mask, offset, scale)
