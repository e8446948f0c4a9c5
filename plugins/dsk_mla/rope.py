"""Rotary position embedding with optional YaRN extension (spec §1.5, §2.3 items 3-4).

Convention: the rope dims are read as interleaved pairs ``(x0, x1), (x2, x3), ...`` (the layout of the released
weights, of the reference ``inference/model.py`` and of HF ``apply_rotary_pos_emb_interleave``), each pair rotated
as the complex number ``x_even + i x_odd``, and written back in place (still interleaved), as the reference code
does. HF writes the rotated pairs de-interleaved instead; the two layouts differ by one fixed permutation applied
alike to q and k, so ``q . k`` and every attention output are the same, and HF checkpoints load with no weight
permutation. A checkpoint saved with ``rope_interleave=False`` must have its rope rows permuted to interleaved order
first (see MLA.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dsk_mla.config import YarnConfig

__all__ = ["RotaryEmbedding", "apply_rope", "rotate", "rope_inv_freq", "softmax_mscale", "yarn_get_mscale"]


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
    """Rotate interleaved pairs of ``x [B, T, ..., d]`` by ``cos, sin [T | B T, d/2]``, in place of each pair."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return rotate(x, torch.complex(cos.to(dtype), sin.to(dtype)))


def rotate(x: Tensor, rot: Tensor) -> Tensor:
    """Multiply the interleaved pairs of ``x [B, T, ..., d]`` (read as complex numbers) by ``rot`` complex [T, d/2]
    (positions shared by the batch) or [B, T, d/2] (a position per row).

    One complex multiply: forward and backward are a single element-wise kernel each, against four real
    multiplies, two strided slices and a concatenation (measured 0.5 ms less per MLA layer, forward + backward,
    at 8 x 128 tokens). Computed in at least float32 (complex32 has few kernels) and cast back to x's dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    # t c | b t c -> t 1.. c | b t 1.. c: singleton dims for any head axes
    rot = rot.view(rot.shape[:-1] + (1,) * (x.dim() - 3) + rot.shape[-1:])
    pairs = x.to(dtype).unflatten(-1, (-1, 2))  # ... (d two) -> ... d two
    # (compiled code cannot read a storage offset: it always asks for contiguous pairs, a no-op when they are)
    if torch.compiler.is_compiling() or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs each pair 8/16-byte aligned
    out = torch.view_as_real(torch.view_as_complex(pairs) * rot).flatten(-2)
    return out.to(x.dtype)


# The last rotation table of each (frequencies, dtype, device, inference mode): every layer of a forward rotates at
# the same `pos` tensor, so the cos/sin table is built once per forward instead of twice per layer.
_TABLES: dict[tuple, tuple[Tensor, int, Tensor]] = {}


class RotaryEmbedding(nn.Module):
    """RoPE tables computed from absolute positions (no max length to outgrow), shared by the layers of a forward."""

    def __init__(self, dim: int, theta: float, scaling: YarnConfig | None = None):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(dim, theta, scaling)
        # not persistent: derived from the config, so it never appears in (HF-named) state dicts
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table_key = (dim, theta, repr(scaling))

    def rotation(self, pos: Tensor, dtype: torch.dtype) -> Tensor:
        """``exp(i * pos * inv_freq) * attention_factor`` as complex [T, d/2] (or [B, T, d/2] for ``pos [B, T]``),
        in ``dtype``'s complex type."""
        # torch.compile cannot guard on a tensor's identity in a global cache (it would replay a stale table of
        # another length), and inductor fuses the table into the block anyway: compiled code always rebuilds it
        cached = not torch.compiler.is_compiling()
        if cached:
            key = (self._table_key, self.inv_freq.dtype, dtype, pos.device, torch.is_inference_mode_enabled())
            hit = _TABLES.get(key)
            if hit is not None and hit[0] is pos and hit[1] == pos._version:
                return hit[2]
        # angles in float32 at least: bf16 angles lose whole radians at long positions
        angles = pos.to(dtype)[..., None] * self.inv_freq.to(dtype)  # [T | B T, d/2]
        rot = torch.polar(torch.full_like(angles, self.attention_factor), angles)
        if cached:
            _TABLES[key] = (pos, pos._version, rot)
        return rot

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """Rotate ``x [B, T, ..., d]`` at absolute positions ``pos [T]`` (shared by the batch) or ``[B, T]`` (per row)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return rotate(x, self.rotation(pos, dtype))
