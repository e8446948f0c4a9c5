"""Pieces shared by MLA and MHA: the preallocated KV cache, mask-to-bias conversion and scaled dot-product attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KVCache", "attend", "attention_bias"]


class KVCache:
    """Preallocated per-layer cache of per-token tensors.

    Every buffer holds ``max_len`` token slots along ``seq_dim``; slots ``[0, length)`` are filled. ``layout``
    names what the buffers hold ("latent": MLA's compressed latent, "full": per-head K and V).
    """

    def __init__(self, buffers: dict[str, Tensor], seq_dim: int, layout: str):
        self.buffers = buffers
        self.seq_dim = seq_dim
        self.layout = layout
        self.length = 0  # a Python int: reading it never syncs with the device

    @property
    def max_len(self) -> int:
        """Token slots available."""
        return next(iter(self.buffers.values())).shape[self.seq_dim]

    def values_per_token(self) -> int:
        """Values stored per token (all buffers, all batch rows counted once)."""
        return sum(b[:1].narrow(self.seq_dim, 0, 1).numel() for b in self.buffers.values())

    def append(self, **new: Tensor) -> dict[str, Tensor]:
        """Write the T new tokens of each buffer at slots ``[length, length+T)``; return views of slots ``[0, length+T)``."""
        n_new = next(iter(new.values())).shape[self.seq_dim]
        if self.length + n_new > self.max_len:
            raise ValueError(
                f"KV cache full: {self.length} cached + {n_new} new tokens > max_len {self.max_len}; "
                "make the cache with a larger max_len"
            )
        out = {}
        for name, value in new.items():
            buf = self.buffers[name]
            buf.narrow(self.seq_dim, self.length, n_new).copy_(value)
            out[name] = buf.narrow(self.seq_dim, 0, self.length + n_new)
        self.length += n_new
        return out

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` tokens (speculative decoding rejects the rest)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate({length}): must be between 0 and the cached length {self.length}")
        self.length = length

    def __repr__(self) -> str:
        return f"KVCache(layout={self.layout!r}, length={self.length}, max_len={self.max_len})"


def attention_bias(
    mask: Tensor | None, n_queries: int, n_keys: int, offset: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """Additive score bias ``[B|1, T, S]`` (0 = may attend, dtype min = masked), or None when nothing is masked.

    ``mask [B, T, S]`` (True = may attend) is used as given; None means causal by slot: query i (slot
    ``offset + i``) sees keys ``0 .. offset + i``. The finite minimum instead of -inf keeps a fully masked row
    (a left-padding query) finite instead of NaN.
    """
    if mask is None:
        if n_queries == 1:
            return None  # the single new token sees every cached key
        q_slot = torch.arange(n_queries, device=device)[:, None] + offset
        mask = (torch.arange(n_keys, device=device)[None, :] <= q_slot)[None]  # [1, T, S]
    elif mask.shape[-2:] != (n_queries, n_keys) or mask.dim() != 3:
        raise ValueError(f"attention mask has shape {tuple(mask.shape)}; expected [B, {n_queries}, {n_keys}]")
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)


# Score-matrix size (T * S) above which attend() pads V to use the fused kernel. Measured forward+backward on CPU,
# 2 threads, causal, MLA head sizes: math vs padded flash 2.8 / 4.0 ms at T = 128 (B 8, 4 heads), 14.2 / 15.2 ms at
# T = 256, 291 / 318 ms at T = 512 (V3 head sizes, 16 heads), 82 / 32 ms at T = 1024.
PAD_V_MIN_SCORES = 512 * 512


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, causal: bool = False) -> Tensor:
    """Softmax attention ``q [B, H, T, dk], k [B, H, S, dk], v [B, H, S, dv] -> [B, H, T, dv]``.

    ``bias [B|1, T, S]`` is added to the scores; ``causal`` (only with ``bias`` None and T == S) masks the future.
    """
    if q.shape[-2] == 1:
        # One query row (decoding): CPU SDPA kernels are ~6x slower than two matmuls here and copy strided cache
        # views. K @ q^T reads the cache row-major (a plain GEMV; q @ K^T was ~1.7x slower on CPU).
        scores = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2) * scale  # b h s d, b h d 1 -> b h 1 s
        # the softmax runs in fp32 (spec §1.6 item 5)
        if bias is not None:
            scores = scores + bias[:, None]
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        return torch.matmul(probs.to(v.dtype), v)  # b h 1 s, b h s d -> b h 1 d
    attn_mask = None if bias is None else bias[:, None]  # b t s -> b 1 t s (broadcast over heads)
    dk, dv = q.shape[-1], v.shape[-1]
    small = q.shape[-2] * k.shape[-2] <= PAD_V_MIN_SCORES
    cpu_float = q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)  # where it was measured
    if small and causal and bias is None and q.shape[-2] == k.shape[-2] and cpu_float:
        return _causal_attention_small(q, k, v, scale)
    # off CPU always pad, so that the fused kernels run: the short-sequence choice was measured on CPU only
    pad = dv < dk and (not small or q.device.type != "cpu")
    if pad:
        # MLA has dv < dk (V3: 128 vs 192). The fused (flash) kernels need equal head sizes and otherwise SDPA
        # takes the unfused math kernel, which materialises the T x S scores: 2-3x slower forward+backward at
        # T = 1024-2048 on CPU. Zero columns of V cost little and leave the first dv output columns unchanged.
        # Short sequences keep the math kernel, the faster one there (T = 128: 2.8 vs 4.0 ms, see PAD_V_MIN_SCORES).
        v = F.pad(v, (0, dk - dv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and bias is None, scale=scale)
    return out[..., :dv] if pad else out


_CAUSAL_BIAS: dict[tuple, Tensor] = {}


def _causal_attention_small(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal softmax attention for short sequences as three batched GEMM-like ops (baddbmm, softmax, bmm).

    SDPA's math kernel, which these sizes take, rebuilds the causal mask on every call and checks for fully
    masked rows (ones, tril, where, isneginf, all); the additive bias here is built once per (T, dtype, device).
    Measured forward + backward at B 8, 4 heads, T 128, dk 48, dv 32 on 2 CPU threads: 2.7 vs 2.9-3.1 ms.
    """
    B, H, T, dk = q.shape
    key = (T, q.dtype, q.device, torch.is_inference_mode_enabled())
    bias = _CAUSAL_BIAS.get(key)
    if bias is None:
        bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        if len(_CAUSAL_BIAS) >= 8:  # a few sequence lengths recur in training; generation brings many
            _CAUSAL_BIAS.pop(next(iter(_CAUSAL_BIAS)))
        _CAUSAL_BIAS[key] = bias
    scores = torch.baddbmm(bias, q.reshape(B * H, T, dk), k.reshape(B * H, T, dk).transpose(1, 2), alpha=scale)
    out = torch.bmm(torch.softmax(scores, dim=-1), v.reshape(B * H, T, v.shape[-1]))
    return out.view(B, H, T, v.shape[-1])
