"""MHA baseline: cached decoding == full forward, causality, cache size, float64 reference."""

from __future__ import annotations

import pytest
import torch
from dsk_mla.config import MHAConfig
from dsk_mla.mha import MHA

from dsk.api import ModelContext

DIM = 24


def make_mha(head_dim=None) -> MHA:
    torch.manual_seed(0)
    ctx = ModelContext(dim=DIM, n_layers=1, vocab_size=16, max_seq_len=64, init_std=0.3)
    return MHA(MHAConfig(n_heads=3, head_dim=head_dim, rope_theta=500.0), ctx).double().eval()


def reference_mha(m: MHA, x, pos):
    """Per-head causal attention with complex (interleaved) RoPE, float64."""
    B, T, _ = x.shape
    H, d = m.n_heads, m.head_dim
    freqs = 500.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(T, d // 2, dtype=torch.float64), pos.double()[:, None] * freqs)

    def rope(v):
        return torch.view_as_real(torch.view_as_complex(v.reshape(B, T, d // 2, 2).contiguous()) * rot).reshape(B, T, d)

    q, k, v = (x @ w.weight.T for w in (m.q_proj, m.k_proj, m.v_proj))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        s = rope(q[..., sl]) @ rope(k[..., sl]).transpose(1, 2) / d**0.5
        heads.append(torch.softmax(s.masked_fill(~causal, -torch.inf), -1) @ v[..., sl])
    return torch.cat(heads, -1) @ m.o_proj.weight.T


def test_forward_matches_float64_reference():
    m = make_mha()
    x, pos = torch.randn(2, 7, DIM, dtype=torch.float64), torch.arange(7) + 2
    with torch.no_grad():
        torch.testing.assert_close(m(x, pos), reference_mha(m, x, pos), rtol=1e-10, atol=1e-12)


def test_cached_decoding_in_chunks_and_tokens_equals_full_forward():
    m = make_mha(head_dim=6)
    x, pos = torch.randn(2, 9, DIM, dtype=torch.float64), torch.arange(9)
    cache = m.make_cache(2, 12)
    with torch.no_grad():
        full = m(x, pos)
        parts = [m(x[:, :4], pos[:4], cache=cache)] + [
            m(x[:, t : t + 1], pos[t : t + 1], cache=cache) for t in range(4, 9)
        ]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-12)
    cache.truncate(4)
    with torch.no_grad():
        torch.testing.assert_close(m(x[:, 4:], pos[4:], cache=cache), full[:, 4:], rtol=1e-10, atol=1e-12)


def test_perturbing_future_tokens_leaves_past_outputs_unchanged():
    m = make_mha()
    x = torch.randn(1, 6, DIM, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 4:] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(m(x2, torch.arange(6))[:, :4], m(x, torch.arange(6))[:, :4], rtol=0, atol=1e-13)


def test_cache_values_per_token_is_two_times_heads_times_head_dim():
    m = make_mha()
    assert m.cache_values_per_token() == 2 * 3 * 8 == m.make_cache(1, 4).values_per_token()


def test_indivisible_dim_without_head_dim_names_the_key():
    ctx = ModelContext(dim=25, n_layers=1, vocab_size=16, max_seq_len=64)
    with pytest.raises(ValueError, match="attention.n_heads = 3"):
        MHA(MHAConfig(n_heads=3), ctx)
