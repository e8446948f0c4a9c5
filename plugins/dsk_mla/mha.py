"""Standard multi-head attention with RoPE and a full K/V cache: the baseline MLA is measured against.

Shapes: B batch, T new tokens, S keys (cached + new), H heads, d head_dim, D model dim.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from dsk.api import Cost, ModelContext
from dsk.api.runtime import PLAIN_LINEAR, LinearSite
from dsk_mla.attention import KVCache, attend, attention_bias
from dsk_mla.config import MHAConfig
from dsk_mla.rope import RotaryEmbedding

__all__ = ["MHA"]


class MHA(nn.Module):
    """Multi-head attention (one K/V head per query head), RoPE on the whole head, Llama-style names.

    Its four projections run through ``linear_impl`` (:class:`dsk.api.LinearLayers`).
    """

    linear_impl = PLAIN_LINEAR

    def __init__(self, cfg: MHAConfig, ctx: ModelContext):
        super().__init__()
        if cfg.head_dim is None and ctx.dim % cfg.n_heads:
            raise ValueError(
                f"attention.n_heads = {cfg.n_heads} does not divide the model dim {ctx.dim}; set attention.head_dim"
            )
        if cfg.head_dim is None and (ctx.dim // cfg.n_heads) % 2:
            raise ValueError(
                f"attention.head_dim = dim // n_heads = {ctx.dim // cfg.n_heads} is odd; RoPE needs an even head_dim"
            )
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim or ctx.dim // cfg.n_heads
        self.init_std = ctx.init_std
        self.dim = ctx.dim
        inner = self.n_heads * self.head_dim
        self.q_proj = nn.Linear(ctx.dim, inner, bias=False)
        self.k_proj = nn.Linear(ctx.dim, inner, bias=False)
        self.v_proj = nn.Linear(ctx.dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, ctx.dim, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_theta)
        self.softmax_scale = self.head_dim**-0.5
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear weights ~ N(0, init_std)."""
        for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(m.weight, std=self.init_std)

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """``x [B, T, D], pos [T] | [B, T] long, mask [B, T, S] bool | None, cache -> y [B, T, D]``.

        With a cache, row b's T tokens go to slots ``cache.lengths[b] ..`` and S = ``cache.span + T``.
        """
        T, H = x.shape[1], self.n_heads
        # RoPE rotates in the b t h d layout; attention wants the heads before the tokens
        lin = self.linear_impl.linear
        q = self.rope(rearrange(lin(x, self.q_proj.weight, "q_proj"), "b t (h d) -> b t h d", h=H), pos)
        k = self.rope(rearrange(lin(x, self.k_proj.weight, "k_proj"), "b t (h d) -> b t h d", h=H), pos)
        q, k = (rearrange(t, "b t h d -> b h t d") for t in (q, k))
        v = rearrange(lin(x, self.v_proj.weight, "v_proj"), "b t (h d) -> b h t d", h=H)
        offset = 0
        if cache is not None:
            if cache.layout != "full":
                raise ValueError(f"MHA cannot use a cache with layout {cache.layout!r}; make it with MHA.make_cache")
            offset = cache.span  # slots before the new tokens (the longest row's, when rows differ)
            if mask is None:
                mask = cache.causal_mask(T)  # rows of different lengths: each sees its own slots only
            new = cache.append(k=k, v=v)
            k, v = new["k"].to(q.dtype), new["v"].to(q.dtype)  # [B, H, S, d]
        S = k.shape[2]
        bias = attention_bias(mask, T, S, offset, q.dtype, q.device) if offset or mask is not None else None
        o = attend(q, k, v, bias, self.softmax_scale, causal=True)
        return lin(rearrange(o, "b h t d -> b t (h d)"), self.o_proj.weight, "o_proj")

    def linear_sites(self) -> list[LinearSite]:
        """The four projections run through ``linear_impl``."""
        inner = self.n_heads * self.head_dim
        sites = [LinearSite(name, inner, self.dim, "dim") for name in ("q_proj", "k_proj", "v_proj")]
        return [*sites, LinearSite("o_proj", self.dim, inner, "attention.head_dim")]

    def make_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty full K/V cache for ``max_len`` tokens."""
        ref = self.k_proj.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        shape = (batch_size, self.n_heads, max_len, self.head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype)
        v = torch.zeros(shape, device=device, dtype=dtype)
        return KVCache({"k": k, "v": v}, seq_dim=2, layout="full")

    def cache_values_per_token(self) -> int:
        """Values cached per token per layer: ``2 * H * d``."""
        return 2 * self.n_heads * self.head_dim

    def cost(self, seq_len: int, act_bytes: int = 2) -> Cost:
        """This layer's parameters, forward FLOPs, saved activations and K/V-cache bytes per token
        (:class:`dsk.api.CostModel`), from its sizes alone (works on the meta device).

        FLOPs: 2 per multiply-add of the four projections, and of the score and value products, ``2 * H * d``
        multiply-adds per key over ``seq_len / 2`` keys on average (causal). Saved activations: x, q, k, v, the
        attention output and the softmax's per-head row statistics. KV cache: ``2 * H * d`` values per token.
        """
        D, inner = self.dim, self.n_heads * self.head_dim
        weights = 4 * D * inner
        return Cost(
            params=weights,
            active_params=weights,
            flops_per_token=2.0 * weights + 2.0 * (seq_len / 2) * 2 * inner,
            activation_bytes_per_token=float((D + 4 * inner + self.n_heads) * act_bytes),
            kv_bytes_per_token=float(self.cache_values_per_token() * act_bytes),
        )
