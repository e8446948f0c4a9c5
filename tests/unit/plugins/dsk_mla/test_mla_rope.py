"""RoPE / YaRN: frequencies and scales against a float64 recomputation of the formulas (spec §1.5, §2.3 item 4)."""

from __future__ import annotations

import math

import pytest
import torch
from dsk_mla.config import YarnConfig
from dsk_mla.rope import RotaryEmbedding, apply_rope, rope_inv_freq, softmax_mscale, yarn_get_mscale


def yarn_freqs_float64(dim, theta, factor, l_orig, beta_fast, beta_slow):
    """Spec §1.5 written out element by element in float64 (Python floats)."""

    def corr_dim(r):
        return dim * math.log(l_orig / (2 * math.pi * r)) / (2 * math.log(theta))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(dim // 2):
        f = theta ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        smooth = 1 - ramp
        out.append(f / factor * (1 - smooth) + f * smooth)
    return torch.tensor(out, dtype=torch.float64), (low, high)


@pytest.mark.parametrize(
    "dim,theta,factor,l_orig,beta_fast,beta_slow",
    [(64, 10000.0, 40.0, 4096, 32, 1), (8, 500.0, 4.0, 32, 32, 1), (16, 10000.0, 8.0, 64, 16, 2)],
)
def test_yarn_frequencies_match_float64_formula(dim, theta, factor, l_orig, beta_fast, beta_slow):
    cfg = YarnConfig(factor=factor, original_max_position_embeddings=l_orig, beta_fast=beta_fast, beta_slow=beta_slow)
    got, _ = rope_inv_freq(dim, theta, cfg)
    want, (low, high) = yarn_freqs_float64(dim, theta, factor, l_orig, beta_fast, beta_slow)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    base = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    torch.testing.assert_close(got[:low], base[:low], rtol=1e-14, atol=0)  # high frequencies kept
    torch.testing.assert_close(got[math.ceil(high) :], base[math.ceil(high) :] / factor, rtol=1e-14, atol=0)


def test_v3_correction_range_and_softmax_mscale():
    _, (low, high) = yarn_freqs_float64(64, 10000.0, 40.0, 4096, 32, 1)
    assert (low, high) == (10, 23)  # spec §1.5 [ran]
    v3 = YarnConfig()  # checkpoint values: factor 40, mscale = mscale_all_dim = 1
    assert softmax_mscale(v3) == pytest.approx(1.873854, abs=1e-6)
    assert rope_inv_freq(64, 10000.0, v3)[1] == 1.0  # attention_factor: cos/sin unscaled for V3


def test_attention_factor_follows_hf_rules():
    assert rope_inv_freq(8, 500.0, YarnConfig(factor=4.0, mscale=0.8, mscale_all_dim=0.6))[1] == pytest.approx(
        yarn_get_mscale(4.0, 0.8) / yarn_get_mscale(4.0, 0.6)
    )
    # mscale unset: 0.1 ln(factor) + 1 on cos/sin, and no softmax rescale when mscale_all_dim is unset
    cfg = YarnConfig(factor=4.0, mscale=0.0, mscale_all_dim=0.0)
    assert rope_inv_freq(8, 500.0, cfg)[1] == pytest.approx(0.1 * math.log(4.0) + 1)
    assert softmax_mscale(cfg) == 1.0
    assert softmax_mscale(None) == 1.0


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, 500.0, YarnConfig(factor=4.0, original_max_position_embeddings=32)).double()
    q, k = torch.randn(1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 8, dtype=torch.float64)

    def score(i, j):
        return (rope(q, torch.tensor([i])) * rope(k, torch.tensor([j]))).sum()

    torch.testing.assert_close(score(7, 3), score(107, 103), rtol=1e-10, atol=1e-12)


def test_interleaved_pairs_are_rotated_in_place():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)  # pairs (1, 2), (3, 4)
    cos, sin = torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # pair 0 rotated by 90 degrees: (1, 2) -> (-2, 1); pair 1 unrotated; the layout stays interleaved
    assert apply_rope(x, cos, sin).tolist() == [[[-2.0, 1.0, 3.0, 4.0]]]


def test_rope_gives_hf_scores_and_keeps_dtype_on_strided_views():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    g = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(8, 1000.0)
    pos = torch.arange(5)
    base = torch.randn(1, 5, 2, 11, generator=g)  # the rope slice of q at an odd offset: a strided view
    q, k = base[..., 3:], torch.randn(1, 5, 8, generator=g)
    angles = pos[:, None].float() * rope.inv_freq.float()[None]
    cos, sin = torch.cat((angles, angles), -1).cos()[None], torch.cat((angles, angles), -1).sin()[None]
    q_hf, k_hf = apply_rotary_pos_emb_interleave(q.transpose(1, 2), k[:, None], cos, sin)  # [1, H, T, d]
    ours = torch.einsum("bthd,bsd->bhts", rope(q, pos), rope(k, pos))
    torch.testing.assert_close(ours, q_hf @ k_hf.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    assert rope(q.bfloat16(), pos).dtype == torch.bfloat16


def test_rotation_table_is_shared_per_pos_tensor_and_rebuilt_when_pos_changes():
    a, b = RotaryEmbedding(8, 1000.0), RotaryEmbedding(8, 1000.0)
    pos = torch.arange(6)
    table = a.rotation(pos, torch.float32)
    assert b.rotation(pos, torch.float32) is table  # the layers of one forward share the table
    pos.add_(3)  # an in-place change of the positions must not reuse the stale table
    moved = a.rotation(pos, torch.float32)
    assert moved is not table
    with torch.inference_mode():  # inference tensors must never leak into a training graph
        assert a.rotation(pos, torch.float32) is not moved
    assert a.rotation(pos, torch.float32) is moved
    assert RotaryEmbedding(8, 500.0).rotation(pos, torch.float32) is not moved  # other frequencies, other table
    torch.testing.assert_close(moved, RotaryEmbedding(8, 1000.0).rotation(torch.arange(3, 9), torch.float32))


@pytest.mark.parametrize("heads", [(), (3,)])
def test_per_row_positions_rotate_each_row_as_its_own_shared_positions(heads):
    # a batch whose rows sit at different offsets (a cache with a length per row) gives pos [B, T]
    rope = RotaryEmbedding(8, 500.0, YarnConfig(factor=4.0, original_max_position_embeddings=32))
    x = torch.randn(3, 2, *heads, 8, dtype=torch.float64)
    pos = torch.tensor([[5, 6], [0, 1], [17, 18]])
    got = rope(x, pos)
    for b in range(3):
        torch.testing.assert_close(got[b : b + 1], rope(x[b : b + 1], pos[b]), rtol=0, atol=0)
