"""Pieces shared by MLA and MHA: the preallocated KV cache, mask-to-bias conversion and scaled dot-product attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KVCache", "attend", "attention_bias"]


class KVCache:
    """Preallocated per-layer cache of per-token tensors, with a length per batch row.

    Every buffer holds ``max_len`` token slots along ``seq_dim``; row b fills slots ``[0, lengths[b])``, and row
    b's next token goes to slot ``lengths[b]`` at position ``lengths[b]`` (:meth:`positions`). Rows may hold
    different lengths (prompts of different lengths, or speculative rows that accepted different numbers of
    drafts): the attention then reads slots ``[0, span + T)`` and :meth:`causal_mask` hides from each row the
    slots past its own tokens. ``layout`` names what the buffers hold ("latent": MLA's compressed latent, "full":
    per-head K and V).

    The lengths are host-side bookkeeping (a Python int while all rows agree, else a CPU LongTensor), so reading
    them never waits for the device.
    """

    def __init__(self, buffers: dict[str, Tensor], seq_dim: int, layout: str):
        self.buffers = buffers
        self.seq_dim = seq_dim
        self.layout = layout
        self._common: int | None = 0  # the length of every row while they agree
        self._rows: Tensor | None = None  # CPU LongTensor [B] once they differ
        self._rows_on_device: Tensor | None = None  # _rows on the buffers' device, made on first use

    @property
    def batch_size(self) -> int:
        """Rows B."""
        return next(iter(self.buffers.values())).shape[0]

    @property
    def max_len(self) -> int:
        """Token slots available per row."""
        return next(iter(self.buffers.values())).shape[self.seq_dim]

    @property
    def device(self) -> torch.device:
        """Where the buffers live."""
        return next(iter(self.buffers.values())).device

    @property
    def lengths(self) -> Tensor:
        """Tokens cached per row: a new CPU LongTensor [B]."""
        if self._common is not None:
            return torch.full((self.batch_size,), self._common, dtype=torch.long)
        return self._rows.clone()

    @property
    def length(self) -> int:
        """The common length of all rows; raises when the rows differ (read :attr:`lengths` then)."""
        if self._common is None:
            raise ValueError(f"the cache rows hold different lengths {self._rows.tolist()}; read .lengths instead")
        return self._common

    @property
    def span(self) -> int:
        """Slots in use by the longest row: new tokens attend over ``span + T`` slots."""
        return self._common if self._common is not None else int(self._rows.max())

    def values_per_token(self) -> int:
        """Values stored per token (all buffers, all batch rows counted once)."""
        return sum(b[:1].narrow(self.seq_dim, 0, 1).numel() for b in self.buffers.values())

    def _lengths_on_device(self) -> Tensor:
        if self._rows_on_device is None:
            self._rows_on_device = self._rows.to(self.device)
        return self._rows_on_device

    def _set_rows(self, rows: Tensor) -> None:
        if bool((rows == rows[0]).all()):
            self._common, self._rows = int(rows[0]), None
        else:
            self._common, self._rows = None, rows
        self._rows_on_device = None

    def positions(self, n: int) -> Tensor:
        """Positions of the next ``n`` tokens of each row: LongTensor [n] when all rows agree, else [B, n].

        [n] is ``length + arange(n)`` (shared by the batch, as a training forward's positions are); [B, n] is
        ``lengths[:, None] + arange(n)``. RoPE takes either.
        """
        steps = torch.arange(n, device=self.device)
        if self._common is not None:
            return steps + self._common
        return self._lengths_on_device()[:, None] + steps

    def causal_mask(self, n: int) -> Tensor | None:
        """The mask [B, n, span + n] (True = may attend) for ``n`` new tokens when rows differ, else None.

        Query i of row b sits at slot ``lengths[b] + i`` and sees slots ``0 .. lengths[b] + i``: its own cached
        and new tokens, never the slots past them (stale, or another row's longer history). With equal rows
        causality by slot needs no mask (``attention_bias`` builds it from the common offset).
        """
        if self._common is not None:
            return None
        query_slot = self.positions(n)  # (B, n)
        keys = torch.arange(self.span + n, device=self.device)
        return keys[None, None, :] <= query_slot[:, :, None]  # (B, n, S)

    def append(self, **new: Tensor) -> dict[str, Tensor]:
        """Write each row's T new tokens at its slots ``[lengths[b], lengths[b] + T)``; return views of slots
        ``[0, span + T)`` of every buffer (what the new tokens attend over)."""
        n_new = next(iter(new.values())).shape[self.seq_dim]
        start = self.span
        if start + n_new > self.max_len:
            raise ValueError(
                f"KV cache full: {start} cached + {n_new} new tokens > max_len {self.max_len}; "
                "make the cache with a larger max_len"
            )
        if self._common is not None:
            for name, value in new.items():
                self.buffers[name].narrow(self.seq_dim, start, n_new).copy_(value)
            self._common += n_new
        else:
            slots = self.positions(n_new)  # (B, T): each row writes at its own offset
            rows = torch.arange(self.batch_size, device=self.device)[:, None]
            for name, value in new.items():
                buf = self.buffers[name]
                # b ... s ... -> b s ...: index (row, slot) pairs; the movedim view writes through to the buffer
                buf.movedim(self.seq_dim, 1)[rows, slots] = value.movedim(self.seq_dim, 1).to(buf.dtype)
            self._rows = self._rows + n_new
            self._rows_on_device = None
        return {name: self.buffers[name].narrow(self.seq_dim, 0, start + n_new) for name in new}

    def truncate(self, length: int | Tensor) -> None:
        """Roll rows back: all to ``length`` (an int), or row b to ``length[b]`` (a LongTensor [B]).

        Speculative decoding rejects drafts this way; a batch prefilled with padding after its shorter prompts
        cuts each row back to its prompt. A row can only shrink: the slots past its length are stale.
        """
        if self._common is not None and not isinstance(length, Tensor):
            if not 0 <= length <= self._common:  # the decoding loop's case: no tensor work
                raise ValueError(f"truncate({length}): must be between 0 and the cached length {self._common}")
            self._common = int(length)
            return
        old = self.lengths
        if isinstance(length, Tensor):
            new = length.detach().to("cpu", torch.long).reshape(-1)
            if new.shape[0] != old.shape[0]:
                raise ValueError(f"truncate: got {new.shape[0]} lengths for a cache of {old.shape[0]} rows")
        else:
            new = torch.full_like(old, int(length))
        bad = (new < 0) | (new > old)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(
                f"truncate: row {row} to {int(new[row])} tokens; must be between 0 and its cached length {int(old[row])}"
            )
        self._set_rows(new)

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only batch rows ``rows`` (a LongTensor of row indices, in the new order): the buffers shrink to them
        and row i becomes old row ``rows[i]``, its tokens and length unchanged. Generation drops finished rows
        this way (``dsk.api.generation.AttentionCache``)."""
        index = rows.to(self.device)
        old = self.lengths
        self.buffers = {name: buf.index_select(0, index) for name, buf in self.buffers.items()}
        self._set_rows(old.index_select(0, rows.to("cpu")))

    def __repr__(self) -> str:
        lengths = self._common if self._common is not None else self._rows.tolist()
        return f"KVCache(layout={self.layout!r}, lengths={lengths}, max_len={self.max_len})"


# causal biases by (T, S, offset, dtype, device, inference mode); a few shapes recur, step after step
_CAUSAL_BIAS: dict[tuple, Tensor] = {}


def attention_bias(
    mask: Tensor | None, n_queries: int, n_keys: int, offset: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """Additive score bias ``[B|1, T, S]`` (0 = may attend, dtype min = masked), or None when nothing is masked.

    ``mask [B, T, S]`` (True = may attend) is used as given; None means causal by slot: query i (slot
    ``offset + i``) sees keys ``0 .. offset + i``. The finite minimum instead of -inf keeps a fully masked row
    (a left-padding query) finite instead of NaN.
    """
    cached = False
    if mask is None:
        if n_queries == 1:
            return None  # the single new token sees every cached key
        # every layer of a forward asks for the same causal bias (a speculative verify, a chunked prefill): build it
        # once; it is only read (scores + bias), and inference mode's tensors cannot leak into autograd
        # (not while torch.compile traces: a traced tensor must not outlive its graph)
        cached = not torch.compiler.is_compiling()
        key = (n_queries, n_keys, offset, dtype, device, torch.is_inference_mode_enabled())
        hit = _CAUSAL_BIAS.get(key) if cached else None
        if hit is not None:
            return hit
        q_slot = torch.arange(n_queries, device=device)[:, None] + offset
        mask = (torch.arange(n_keys, device=device)[None, :] <= q_slot)[None]  # [1, T, S]
    elif mask.shape[-2:] != (n_queries, n_keys) or mask.dim() != 3:
        raise ValueError(f"attention mask has shape {tuple(mask.shape)}; expected [B, {n_queries}, {n_keys}]")
    bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    if cached:
        if len(_CAUSAL_BIAS) >= 64:
            _CAUSAL_BIAS.clear()
        _CAUSAL_BIAS[key] = bias
    return bias


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


# additive causal biases of _causal_attention_small by (T, dtype, device, inference mode)
_SMALL_CAUSAL_BIAS: dict[tuple, Tensor] = {}


def _causal_attention_small(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal softmax attention for short sequences as three batched GEMM-like ops (baddbmm, softmax, bmm).

    SDPA's math kernel, which these sizes take, rebuilds the causal mask on every call and checks for fully
    masked rows (ones, tril, where, isneginf, all); the additive bias here is built once per (T, dtype, device).
    Measured forward + backward at B 8, 4 heads, T 128, dk 48, dv 32 on 2 CPU threads: 2.7 vs 2.9-3.1 ms.
    """
    B, H, T, dk = q.shape
    key = (T, q.dtype, q.device, torch.is_inference_mode_enabled())
    bias = _SMALL_CAUSAL_BIAS.get(key)
    if bias is None:
        bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        if len(_SMALL_CAUSAL_BIAS) >= 8:  # a few sequence lengths recur in training; generation brings many
            _SMALL_CAUSAL_BIAS.pop(next(iter(_SMALL_CAUSAL_BIAS)))
        _SMALL_CAUSAL_BIAS[key] = bias
    scores = torch.baddbmm(bias, q.reshape(B * H, T, dk), k.reshape(B * H, T, dk).transpose(1, 2), alpha=scale)
    out = torch.bmm(torch.softmax(scores, dim=-1), v.reshape(B * H, T, v.shape[-1]))
    return out.view(B, H, T, v.shape[-1])
