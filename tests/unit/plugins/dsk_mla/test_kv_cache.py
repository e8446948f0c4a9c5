"""The attention-cache contract: a length per row (ragged rows decode as alone, per-row truncation, positions)."""

from __future__ import annotations

import pytest
import torch
from dsk_mla.attention import KVCache
from dsk_mla.config import MHAConfig
from dsk_mla.mha import MHA

from dsk.api import AttentionCache, ModelContext
from tests.unit.plugins.dsk_mla.test_mla import DIM, YARN, inputs, make_mla


def make_mha(seed=0) -> MHA:
    torch.manual_seed(seed)
    ctx = ModelContext(dim=DIM, n_layers=1, vocab_size=16, max_seq_len=64, init_std=0.3)
    return MHA(MHAConfig(n_heads=4, rope_theta=500.0), ctx).to(torch.float64).eval()


ATTENTIONS = {
    "mla-latent": lambda: (make_mla(rope_scaling=YARN), {"layout": "latent"}),
    "mla-full": lambda: (make_mla(rope_scaling=YARN), {"layout": "full"}),
    "mha": lambda: (make_mha(), {}),
}


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_caches_meet_the_attention_cache_protocol(kind):
    attn, kw = ATTENTIONS[kind]()
    cache = attn.make_cache(3, 8, **kw)
    assert isinstance(cache, AttentionCache)
    assert cache.lengths.tolist() == [0, 0, 0] and cache.lengths.dtype == torch.long


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_rows_of_different_lengths_decode_as_each_row_alone(kind):
    # one batch cache whose rows hold 7, 4 and 6 tokens (a padded prefill cut back row by row), then 3 chunks
    # with the default per-row positions and causal masking; every row must match its own unbatched run
    attn, kw = ATTENTIONS[kind]()
    lens = [7, 4, 6]
    x, _ = inputs(B=3, T=12, seed=2)
    prefill = x[:, :7].clone()
    for b, n in enumerate(lens):
        prefill[b, n:] = 5.0  # padding: its slots are cut off and then overwritten by the decoded tokens
    with torch.no_grad():
        cache = attn.make_cache(3, 12, **kw)
        attn(prefill, torch.arange(7), cache=cache)
        cache.truncate(torch.tensor(lens))
        assert cache.lengths.tolist() == lens and cache.span == 7
        outs = []
        for chunk in (1, 2, 1):
            cols = torch.tensor(lens)[:, None] + torch.arange(chunk)  # row b's next tokens sit at lens[b] ..
            step_x = x[torch.arange(3)[:, None], cols]  # (B, chunk, D)
            pos = cache.positions(chunk)
            assert pos.shape == (3, chunk) and torch.equal(pos, cols)
            outs.append(attn(step_x, pos, cache=cache))
            lens = [n + chunk for n in lens]
        got = torch.cat(outs, 1)  # (B, 4, D)
        for b, n in enumerate([7, 4, 6]):
            alone = attn(x[b : b + 1, : n + 4], torch.arange(n + 4))  # no cache at all
            torch.testing.assert_close(got[b : b + 1], alone[:, n:], rtol=1e-10, atol=1e-12)
    assert cache.lengths.tolist() == [11, 8, 10]


@pytest.mark.parametrize("kind", ATTENTIONS)
def test_truncating_one_row_leaves_the_other_rows_untouched(kind):
    attn, kw = ATTENTIONS[kind]()
    x, pos = inputs(B=2, T=9, seed=3)
    other = torch.randn(2, 3, DIM, dtype=torch.float64)
    with torch.no_grad():
        kept = attn.make_cache(2, 12, **kw)
        attn(x[:, :6], pos[:6], cache=kept)
        cache = attn.make_cache(2, 12, **kw)
        attn(x[:, :6], pos[:6], cache=cache)
        before = {k: v.clone() for k, v in cache.buffers.items()}
        cache.truncate(torch.tensor([6, 2]))  # roll row 1 back only
        for name, buf in cache.buffers.items():
            assert torch.equal(buf[0], before[name][0])  # row 0 is bit for bit what it was
        assert cache.lengths.tolist() == [6, 2]
        # row 1 redecodes different tokens over its rolled-back slots; row 0 goes on from 6 as if nothing happened
        y = attn(torch.stack([x[0, 6:9], other[1]]), cache.positions(3), cache=cache)
        y_kept = attn(x[:, 6:9], pos[6:9], cache=kept)
        torch.testing.assert_close(y[0], y_kept[0], rtol=1e-12, atol=1e-13)
        alone = attn(torch.cat([x[1:, :2], other[1:]], 1), torch.arange(5))
        torch.testing.assert_close(y[1:], alone[:, 2:], rtol=1e-10, atol=1e-12)


def test_positions_are_shared_while_rows_agree_and_per_row_once_they_differ():
    cache = KVCache({"kv": torch.zeros(2, 10, 3)}, seq_dim=1, layout="latent")
    cache.append(kv=torch.ones(2, 4, 3))
    assert cache.length == 4 and torch.equal(cache.positions(2), torch.tensor([4, 5]))
    assert cache.causal_mask(2) is None  # causality by slot needs no mask
    cache.truncate(torch.tensor([4, 1]))
    assert torch.equal(cache.positions(2), torch.tensor([[4, 5], [1, 2]]))
    with pytest.raises(ValueError, match="different lengths"):
        _ = cache.length
    mask = cache.causal_mask(1)
    assert mask.shape == (2, 1, 5) and mask[1, 0].tolist() == [True, True, False, False, False]
    cache.truncate(1)  # an int cuts every row; rows agree again
    assert cache.length == 1 and cache.positions(1).tolist() == [1]


def test_ragged_append_writes_each_row_at_its_own_offset():
    cache = KVCache({"k": torch.zeros(2, 1, 6, 1)}, seq_dim=2, layout="full")
    cache.append(k=torch.arange(1.0, 4.0).view(1, 1, 3, 1).repeat(2, 1, 1, 1))  # rows hold 1, 2, 3
    cache.truncate(torch.tensor([3, 1]))
    views = cache.append(k=torch.tensor([7.0, 9.0]).view(2, 1, 1, 1))
    assert views["k"].shape == (2, 1, 4, 1)  # span 3 + 1 new token
    assert cache.buffers["k"][:, 0, :4, 0].tolist() == [[1, 2, 3, 7], [1, 9, 3, 0]]
    assert cache.lengths.tolist() == [4, 2]


@pytest.mark.parametrize(
    ("length", "match"),
    [
        (5, "between 0 and"),
        (torch.tensor([2, 5]), "row 1 to 5"),
        (torch.tensor([1, 1, 1]), "3 lengths"),
        (-1, "between 0 and"),
    ],
)
def test_truncate_only_shrinks_rows(length, match):
    cache = KVCache({"kv": torch.zeros(2, 6, 1)}, seq_dim=1, layout="latent")
    cache.append(kv=torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match=match):
        cache.truncate(length)
    assert cache.lengths.tolist() == [3, 3]


def test_appending_past_max_len_is_refused_for_the_longest_row():
    cache = KVCache({"kv": torch.zeros(2, 4, 1)}, seq_dim=1, layout="latent")
    cache.append(kv=torch.zeros(2, 4, 1))
    cache.truncate(torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="KV cache full"):
        cache.append(kv=torch.zeros(2, 1, 1))
