"""E4M3 quantisation over tiles: the one place where a tensor becomes FP8 values and scales.

DeepSeek-V3's recipe (report §3.3.2): an activation (or activation gradient) gets one scale per 1 x B tile along
the GEMM's reduction dim K, a weight one scale per B x B block, and the weight-gradient GEMM reads its inputs in
B x 1 tiles along the tokens. Every scale comes from the tile's current amax (``scale = amax / 448``, amax clamped at
1e-4 like the reference ``act_quant``), optionally rounded up to a power of two. ``tensorwise`` is one scale for
the whole matrix: the baseline that shows why fine-grained tiles matter (one outlier flattens every other value).

A quantised matrix is a :class:`QTensor`: E4M3 data ``[..., M, K]`` and float32 scales ``[..., ceil(M/tm),
ceil(K/tk)]`` for tiles ``(tm, tk)``; a partial last tile on either axis is allowed (its amax covers only the real
elements). Leading dims are batch dims (the stacked experts ``[E, N, K]``): tiles never cross them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AMAX_EPS", "E4M3", "E4M3_MAX", "QTensor", "e4m3_to_float32", "quantize", "scales_from_amax"]

E4M3 = torch.float8_e4m3fn
#: largest finite E4M3 value
E4M3_MAX = 448.0
#: amax floor (the DeepSeek reference act_quant): an all-zero tile gets a finite, tiny scale
AMAX_EPS = 1e-4


def scales_from_amax(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """``amax / 448`` in float32 (amax clamped at :data:`AMAX_EPS`), rounded up to ``2^ceil(log2)`` if ``pow2``.

    Rounding up keeps ``|x| / scale <= 448``; a power-of-two scale makes the scaling exact (an exponent shift).
    """
    scale = amax.float().clamp(min=AMAX_EPS) / E4M3_MAX
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


_LUT: dict[torch.device, torch.Tensor] = {}


def e4m3_to_float32(data: torch.Tensor) -> torch.Tensor:
    """``data.float()`` through a 256-entry table of every E4M3 bit pattern (bit-identical, ~4x faster on CPU)."""
    lut = _LUT.get(data.device)
    if lut is None:
        lut = _LUT[data.device] = torch.arange(256, dtype=torch.uint8, device=data.device).view(E4M3).float()
    codes = data.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return lut.index_select(0, codes).reshape(data.shape)


@dataclass
class QTensor:
    """An E4M3 matrix (or a batch of them) with one float32 scale per ``tile``.

    Attributes:
        data: E4M3 values ``[..., M, K]``; the real value is ``data * scale`` of its tile.
        scale: ``[..., ceil(M / tile[0]), ceil(K / tile[1])]`` float32.
        tile: ``(tm, tk)``, each at most the matrix's size on its axis.
    """

    data: torch.Tensor
    scale: torch.Tensor
    tile: tuple[int, int]

    def t(self) -> QTensor:
        """The transpose ``[..., K, M]`` (a view; the same tiles, transposed)."""
        return QTensor(self.data.transpose(-2, -1), self.scale.transpose(-2, -1), (self.tile[1], self.tile[0]))

    def expanded_scale(self) -> torch.Tensor:
        """The scale of every element, ``[..., M, K]`` float32."""
        M, K = self.data.shape[-2:]
        tm, tk = self.tile
        return self.scale.repeat_interleave(tm, dim=-2)[..., :M, :].repeat_interleave(tk, dim=-1)[..., :K]

    def dequantize(self) -> torch.Tensor:
        """The exact values the FP8 operand stands for, as float32 ``[..., M, K]`` (one rounding: the product)."""
        M, K = self.data.shape[-2:]
        tm, tk = self.tile
        mb, kb = self.scale.shape[-2:]
        values = e4m3_to_float32(self.data)
        if (mb * tm, kb * tk) != (M, K):  # partial edge tiles: pad to whole tiles, scale, crop
            values = F.pad(values, (0, kb * tk - K, 0, mb * tm - M))
        tiles = values.reshape(*values.shape[:-2], mb, tm, kb, tk) * self.scale.unsqueeze(-1).unsqueeze(-3)
        return tiles.reshape(values.shape)[..., :M, :K]

    def row_scales(self, chunk: int) -> torch.Tensor:
        """The scale of each row in each ``chunk``-wide K chunk, ``[..., M, ceil(K / chunk)]``.

        A chunk lies inside one tile along K (tiles are ``chunk`` wide, or the whole K for tensorwise scales), so
        a rowwise-scaled GEMM per chunk (``torch._scaled_mm``) sees one scale per row.
        """
        M, K = self.data.shape[-2:]
        tm, tk = self.tile
        n_chunks = math.ceil(K / chunk)
        if tk % chunk and tk < K:
            raise ValueError(f"a K tile of {tk} is not a whole number of {chunk}-wide chunks")
        col = torch.arange(n_chunks, device=self.scale.device) * chunk // tk  # the K tile of each chunk
        return self.scale.repeat_interleave(tm, dim=-2)[..., :M, :].index_select(-1, col)


def quantize(x: torch.Tensor, tile: tuple[int, int] | None, pow2: bool = False) -> QTensor:
    """E4M3 values and scales of ``x [..., M, K]`` over ``tile = (tm, tk)`` tiles (``None``: one per matrix).

    Values are computed in float32 (``x / scale``, clamped to ±448 before the cast, which rounds to nearest);
    a tile larger than the matrix is clipped to it.
    """
    M, K = x.shape[-2:]
    tm, tk = (M, K) if tile is None else (min(tile[0], M), min(tile[1], K))
    tm, tk = max(tm, 1), max(tk, 1)
    mb, kb = math.ceil(M / tm), math.ceil(K / tk)
    xf = x.float()
    # pad to whole tiles with zeros (they do not change an amax), view as [..., mb, tm, kb, tk]
    padded = F.pad(xf, (0, kb * tk - K, 0, mb * tm - M)) if (mb * tm, kb * tk) != (M, K) else xf
    tiles = padded.reshape(*x.shape[:-2], mb, tm, kb, tk)
    scale = scales_from_amax(tiles.abs().amax(dim=(-3, -1)), pow2)  # [..., mb, kb]
    q = tiles / scale.unsqueeze(-1).unsqueeze(-3)
    q = q.clamp(-E4M3_MAX, E4M3_MAX).reshape(padded.shape)[..., :M, :K].to(E4M3)
    return QTensor(q, scale, (tm, tk))
