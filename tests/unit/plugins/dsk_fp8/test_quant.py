"""The E4M3 tile quantisation: scales from the current amax per tile, partial edge tiles, powers of two."""

from __future__ import annotations

import torch
from dsk_fp8.quant import AMAX_EPS, E4M3, E4M3_MAX, e4m3_to_float32, quantize


def test_each_tile_scale_is_its_amax_over_448_and_the_values_fit_e4m3():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 20, generator=g, dtype=torch.float64)
    q = quantize(x, (2, 8))  # 3 x 3 tiles, the last row and column tiles partial
    assert q.data.dtype == E4M3 and q.scale.shape == (3, 3) and q.tile == (2, 8)
    for i in range(3):
        for j in range(3):
            tile = x[2 * i : 2 * i + 2, 8 * j : 8 * j + 8]
            assert q.scale[i, j] == tile.float().abs().max() / E4M3_MAX  # amax in float32, then / 448
    assert q.data.float().abs().max() <= E4M3_MAX
    # each tile's largest element lands on (or next to) 448 after scaling: the range is used in every tile
    deq = q.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == x.shape
    torch.testing.assert_close(deq.double(), x, rtol=2**-4, atol=1e-6)  # E4M3: 3 mantissa bits


def test_dequantize_is_the_e4m3_value_times_its_tile_scale():
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(1))
    q = quantize(x, (1, 4))
    want = q.data.float() * q.scale.repeat_interleave(4, dim=1)
    assert torch.equal(q.dequantize(), want)
    assert torch.equal(q.expanded_scale(), q.scale.repeat_interleave(4, dim=1))


def test_lookup_table_conversion_is_bit_identical_to_float():
    every = torch.arange(256, dtype=torch.uint8).view(E4M3)
    a, b = e4m3_to_float32(every), every.float()
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


def test_pow2_scales_are_powers_of_two_that_cover_the_amax():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 37.0
    q = quantize(x, (1, 16), pow2=True)
    log2 = torch.log2(q.scale)
    assert torch.equal(log2, log2.round())
    plain = quantize(x, (1, 16))
    assert (q.scale >= plain.scale).all() and (q.scale < 2 * plain.scale).all()
    assert q.data.float().abs().max() <= E4M3_MAX


def test_tensorwise_is_one_scale_and_zero_tiles_get_the_amax_floor():
    x = torch.zeros(3, 32)
    x[0, :16] = torch.linspace(-2, 3, 16)
    assert quantize(x, None).scale.shape == (1, 1)
    q = quantize(x, (1, 16))
    assert q.scale[1, 0] == torch.tensor(AMAX_EPS / E4M3_MAX)  # an all-zero tile: finite, no 0/0
    assert torch.equal(q.dequantize()[1:], x[1:]) and not q.data.float().isnan().any()


def test_batched_tiles_do_not_cross_the_leading_dim():
    w = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(3))
    w[1] *= 1000.0
    q = quantize(w, (4, 4))
    assert q.scale.shape == (3, 2, 2)
    for e in range(3):
        assert torch.equal(q.scale[e], quantize(w[e], (4, 4)).scale)
