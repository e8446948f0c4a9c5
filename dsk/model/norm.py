"""RMSNorm of the core skeleton (block norms and the final norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsk import kernels


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
        """x [..., D] -> [..., D]."""
        if kernels.supports(x, self.weight) and kernels.load() is not None:
            return kernels.rms_norm(x, self.weight, self.eps)  # float32/64 on CPU: one fused pass each way
        y = F.rms_norm(x.to(torch.promote_types(x.dtype, torch.float32)), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
