"""Rotary position embedding with optional YaRN extension (spec §1.5, §2.3 items 3-4).

Convention: HF ``apply_rotary_pos_emb_interleave`` (DeepseekV3, ``rope_interleave=True``). The input's rope dims
are read as interleaved pairs ``(x0, x1), (x2, x3), ...`` (the layout of the released weights and of the reference
``inference/model.py``); the output is written de-interleaved, ``[x_even*cos - x_odd*sin, x_odd*cos + x_even*sin]``.
q and k come out in the same layout, so ``q.k`` equals the reference's, and HF checkpoints load with no weight
permutation. A checkpoint saved with ``rope_interleave=False`` must have its rope rows permuted to interleaved order
first (see MLA.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dsk_mla.config import YarnConfig

__all__ = ["RotaryEmbedding", "apply_rope", "rope_inv_freq", "softmax_mscale", "yarn_get_mscale"]


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_mscale(scaling: YarnConfig | None) -> float:
    """Factor applied to the softmax scale: ``yarn_get_mscale(factor, mscale_all_dim)^2`` under YaRN, else 1.

    HF ``yarn_apply_mscale`` multiplies only when ``mscale_all_dim`` is set (non-zero).
    """
    if scaling is None or not scaling.mscale_all_dim:
        return 1.0
    m = yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)
    return m * m


def rope_inv_freq(dim: int, theta: float, scaling: YarnConfig | None = None) -> tuple[Tensor, float]:
    """Inverse frequencies ``[dim/2]`` (float64) and the cos/sin attention factor.

    Without scaling: ``theta^(-2i/dim)``. With YaRN (HF ``_compute_yarn_parameters``, truncate=True): frequencies
    below the correction range ``[floor(corr(beta_fast)), ceil(corr(beta_slow))]`` are divided by ``factor``,
    those above are kept, and a linear ramp blends in between.
    """
    # float64 so that float64 parity tests see exact frequencies; forward computes angles in >= float32.
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling.factor

    def corr_dim(num_rotations: float) -> float:
        # the dim index whose wavelength fits num_rotations times into the original context
        return (
            dim
            * math.log(scaling.original_max_position_embeddings / (num_rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low = max(math.floor(corr_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(corr_dim(scaling.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # HF: avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep the frequency), 0 = interpolate (divide by factor)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    if scaling.mscale and scaling.mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, scaling.mscale) / yarn_get_mscale(factor, scaling.mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)
    return inv_freq, attention_factor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x [B, T, ..., d]`` by ``cos, sin [T, d/2]``; output de-interleaved ``[B, T, ..., d]``."""
    # insert singleton dims for any head axes between T and d
    shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + (cos.shape[1],)
    cos, sin = cos.view(shape).to(x.dtype), sin.view(shape).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # ... (d two) -> ... d, two  (real, imaginary parts)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE tables computed on the fly from absolute positions (no max length to outgrow)."""

    def __init__(self, dim: int, theta: float, scaling: YarnConfig | None = None):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(dim, theta, scaling)
        # not persistent: derived from the config, so it never appears in (HF-named) state dicts
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """Rotate ``x [B, T, ..., d]`` at absolute positions ``pos [T]``."""
        # angles in float32 at least: bf16 angles lose whole radians at long positions
        dtype = torch.promote_types(x.dtype, torch.float32)
        angles = pos.to(dtype)[:, None] * self.inv_freq.to(dtype)[None, :]  # [T, d/2]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return apply_rope(x, cos, sin)
