"""RMSNorm of the core skeleton (block norms, the final norm, and any component's norm), with its CPU kernel.

The kernel (``csrc/rms_norm.cpp``) runs the forward and the backward in one pass each over the activations, where
ATen's composition takes ~8 element-wise kernels forward and ~12 backward. It is taken for plain float32/float64
CPU tensors when it builds (:mod:`dsk.extension`); everything else runs the PyTorch path it is tested against.
Every RMSNorm forward is the region ``"norm"`` (:mod:`dsk.model.regions`), which selective recomputation recomputes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsk.extension import CppExtension, cpu_kernel_supports
from dsk.model.regions import recomputable

__all__ = ["RMSNorm", "rms_norm_kernel", "EXTENSION"]

#: The fused RMSNorm kernel; ``EXTENSION.load()`` is the module or None (then the PyTorch path runs).
EXTENSION = CppExtension("dsk_rms_norm", [Path(__file__).parent / "csrc" / "rms_norm.cpp"])


class _RMSNormFunction(torch.autograd.Function):
    """The kernel as an autograd node. It keeps ``x`` as it came (often a strided view of a wider projection, e.g.
    MLA's latent) and redoes the contiguous copy in the backward, rather than keeping a copy from the forward."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        y, rstd = EXTENSION.load().rms_norm_forward(_rows(x), weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        dx, dw = EXTENSION.load().rms_norm_backward(_rows(dy), _rows(x), weight, rstd)
        return dx.view(x.shape), dw, None


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` over the last dim by the kernel; differentiable in both.

    x [..., D] and weight [D]: tensors :func:`~dsk.extension.cpu_kernel_supports` accepts, with ``EXTENSION.load()``
    not None (the caller checks both).
    """
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return EXTENSION.load().rms_norm_forward(_rows(x), weight.contiguous(), eps)[0].view(x.shape)
    return _RMSNormFunction.apply(x, weight.contiguous(), eps)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim (spec §1.4).

    The statistic is computed in at least float32 and cast back before the weight multiplies, as HF's
    ``DeepseekV3RMSNorm`` does, so bf16 activations match the reference and float64 tests stay float64.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D] (the recomputable region ``"norm"``)."""
        return recomputable("norm", self._normalise, x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernel_supports(x, self.weight) and EXTENSION.load() is not None:
            return rms_norm_kernel(x, self.weight, self.eps)  # float32/64 on CPU: one fused pass each way
        y = F.rms_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
