"""Template of an ``attention`` plugin: causal multi-head attention with RoPE and its own KV cache."""

SUMMARY = "causal multi-head attention with rotary positions and its own KV cache"
MODULE = "attention"
TABLE = "[model.attention]"
IMPL_NAME = "{Class}"
CONTRACT = "`dsk.testing.contracts.model.check_attention`"

CONFIG = '''\
"""Options of the $comp attention: the [model.attention] table. Torch-free; every field defaulted."""

from dsk.api import BaseConfig
from pydantic import Field


class $Config(BaseConfig):
    """Multi-head attention: H heads of D / H dims, RoPE on the whole head, a full K/V cache."""

    n_heads: int = Field(4, ge=1, description="attention heads H (the model dim must be divisible by it)")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
'''

IMPL = '''\
"""The $comp attention: causal multi-head attention with rotary positions (RoPE) and a per-row KV cache.

Contract (docs/plugins.md, "attention"): built as `$Class(config, ctx)`;
`forward(x [B, T, D], pos [T] | [B, T], mask [B, T, S] | None, cache | None) -> y [B, T, D]` and
`make_cache(batch, max_len, device, dtype)` -> a cache with `lengths` (CPU long [B]), `max_len`,
`positions(n)` and `truncate(length)` (dsk.api.AttentionCache). With a cache, row b's T new tokens go to slots
`lengths[b] ..` and attend over that row's tokens only. mask None means causal.

Change `forward` (the scores, the heads) or the cache layout to make it yours; the contract suite checks
that cached decoding still equals the full forward. Shapes: B batch, T new tokens, S keys, H heads, d head dim.
"""

import torch
import torch.nn.functional as F
from dsk.api import ModelContext
from einops import rearrange
from torch import nn

from .config import $Config


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs of dims of x [B, H, T, d] by angle pos * theta^(-2i/d); pos [T] or [B, T]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)  # (d/2,)
    angles = pos.to(x.device, torch.float64)[..., None] * inv_freq  # (T, d/2) or (B, T, d/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, d/2): the same for every head
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., d/2, 2)
    return out.flatten(-2)


class KVCache:
    """Keys and values of every row: buffers [B, H, max_len, d], row b holding its first lengths[b] tokens."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._lengths = torch.zeros(batch, dtype=torch.long)  # host-side bookkeeping

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens cached per row (a new CPU LongTensor [B])."""
        return self._lengths.clone()

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def positions(self, n: int) -> torch.Tensor:
        """Positions of the next n tokens: [n] when every row holds as many tokens, else [B, n]."""
        step = torch.arange(n)
        if bool((self._lengths == self._lengths[0]).all()):
            return (int(self._lengths[0]) + step).to(self.k.device)
        return (self._lengths[:, None] + step).to(self.k.device)

    def truncate(self, length) -> None:
        """Roll back to `length` tokens per row (an int, or a LongTensor [B]); a row only shrinks."""
        new = torch.as_tensor(length, dtype=torch.long).expand_as(self._lengths).cpu()
        if bool((new < 0).any() | (new > self._lengths).any()):
            raise ValueError(f"cannot truncate a cache of lengths {self._lengths.tolist()} to {new.tolist()}")
        self._lengths = new.clone()

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, d] at each row's next slots; returns the keys, values [B, H, S, d] and the
        lengths before the write (CPU [B]), S = the longest row's tokens after it."""
        B, _, T, _ = k.shape
        if int(self._lengths.max()) + T > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens; {T} more do not fit")
        before = self._lengths.clone()
        slots = (before[:, None] + torch.arange(T)).to(self.k.device)  # (B, T)
        rows = torch.arange(B, device=self.k.device)[:, None]  # (B, 1)
        # advanced indices around a slice put the indexed dims first: (B, T, H, d)
        self.k[rows, :, slots] = rearrange(k, "b h t d -> b t h d").to(self.k.dtype)
        self.v[rows, :, slots] = rearrange(v, "b h t d -> b t h d").to(self.v.dtype)
        self._lengths = before + T
        S = int(self._lengths.max())
        return self.k[:, :, :S], self.v[:, :, :S], before


class $Class(nn.Module):
    """Causal multi-head attention: q, k, v, o projections, RoPE on q and k."""

    def __init__(self, config: $Config, ctx: ModelContext):
        super().__init__()
        if ctx.dim % config.n_heads or (ctx.dim // config.n_heads) % 2:
            raise ValueError(
                f"attention.n_heads = {config.n_heads}: the model dim {ctx.dim} must split into heads of an even "
                "number of dims (RoPE rotates pairs)"
            )
        self.cfg = config
        self.n_heads = config.n_heads
        self.head_dim = ctx.dim // config.n_heads
        self.q_proj = nn.Linear(ctx.dim, ctx.dim, bias=False)
        self.k_proj = nn.Linear(ctx.dim, ctx.dim, bias=False)
        self.v_proj = nn.Linear(ctx.dim, ctx.dim, bias=False)
        self.o_proj = nn.Linear(ctx.dim, ctx.dim, bias=False)
        for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(m.weight, std=ctx.init_std)

    def make_cache(self, batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty cache of `max_len` tokens per row."""
        ref = self.k_proj.weight
        return KVCache(batch, self.n_heads, max_len, self.head_dim, device or ref.device, dtype or ref.dtype)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None, cache=None):
        """x [B, T, D], pos [T] | [B, T], mask [B, T, S] bool (True: may attend) | None, cache -> y [B, T, D]."""
        T, H = x.shape[1], self.n_heads
        q = rope(rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=H), pos, self.cfg.rope_theta)
        k = rope(rearrange(self.k_proj(x), "b t (h d) -> b h t d", h=H), pos, self.cfg.rope_theta)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", h=H)
        if cache is None:
            if mask is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # (B, 1, T, S): every head
        else:
            k, v, before = cache.append(k, v)  # (B, H, S, d)
            if mask is None:
                # row b's query t sits at slot before[b] + t and sees the slots up to it (its own row's only)
                S = k.shape[2]
                limit = (before[:, None] + torch.arange(T))[:, :, None]  # (B, T, 1)
                mask = (torch.arange(S)[None, None, :] <= limit).to(x.device)  # (B, T, S)
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None])
        return self.o_proj(rearrange(o, "b h t d -> b t (h d)"))
'''

TEST = '''\
"""$comp against dsk's attention contract suite (causality, cached decoding, truncate, gradients, state)."""

import pytest
import torch
from dsk.api import AttentionCache, ModelContext
from dsk.testing.contracts.model import check_attention, check_config_round_trip, check_registration

from $pkg import plugin
from $pkg.attention import $Class
from $pkg.config import $Config

CTX = ModelContext(dim=16, n_layers=1, vocab_size=16, max_seq_len=16, init_std=0.3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_meets_the_attention_contract(dtype):
    check_attention(lambda: $Class($Config(n_heads=2, rope_theta=500.0), CTX).to(dtype), dim=16, max_len=8)


def test_rows_of_different_lengths_decode_like_each_alone():
    torch.manual_seed(0)
    attn = $Class($Config(n_heads=2), CTX).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    cache = attn.make_cache(2, 8)
    assert isinstance(cache, AttentionCache)
    with torch.no_grad():
        attn(x[:, :3], cache.positions(3), None, cache)
        cache.truncate(torch.tensor([3, 2]))  # row 1 rolls back one token
        y = attn(x[:, 3:4], cache.positions(1), None, cache)
        alone = attn(torch.cat((x[1:, :2], x[1:, 3:4]), dim=1), torch.arange(3))
    torch.testing.assert_close(y[1, 0], alone[0, -1])


def test_config_round_trip():
    check_config_round_trip($Config, {"n_heads": 8, "rope_theta": 500.0})


def test_registered_as_attention():
    check_registration(plugin, "attention", "$comp")
'''

RECIPE = {
    "model.attention": 'type = "$comp"\nn_heads = 2',
}
