"""The FP8 GEMMs against float64: outliers (fine-grained vs tensorwise), both backward GEMMs, the two back ends,
the grouped expert path against one dense GEMM per expert, autocast and determinism."""

from __future__ import annotations

import pytest
import torch
from dsk_fp8.gemm import FP8Recipe, fp8_grouped, fp8_linear

OUTLIER = 1e5  # >= 1e5 x the typical magnitude (1): E4M3's 448 / 2^-9 range cannot hold both in one scale


def _mean_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over rows of ``||a_r - ref_r|| / ||ref_r||`` (an outlier spoils its own row, not the mean)."""
    return ((a.double() - ref).norm(dim=1) / ref.norm(dim=1)).mean().item()


def _grads(x, w, dy, recipe):
    x = x.float().detach().requires_grad_()
    w = w.float().detach().requires_grad_()
    y = fp8_linear(x, w, recipe)
    y.backward(dy.float())
    return y, x.grad, w.grad


@pytest.fixture(scope="module")
def outlier_data():
    g = torch.Generator().manual_seed(0)
    M, K, N = 256, 512, 256
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) * 0.02
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    for i, k in ((3, 17), (100, 300), (201, 450)):
        x[i, k] = OUTLIER
    for i, n in ((7, 5), (150, 200)):
        dy[i, n] = OUTLIER
    return x, w, dy


def test_fine_grained_scaling_beats_tensorwise_on_outliers_in_all_three_gemms(outlier_data):
    x, w, dy = outlier_data
    ref = {"forward y": x @ w.t(), "dgrad dX": dy @ w, "wgrad dW": dy.t() @ x}
    errors = {}
    for scaling in ("blockwise", "tensorwise"):
        y, dx, dw = _grads(x, w, dy, FP8Recipe(128, scaling == "tensorwise", False, "dequant"))
        # dW's columns are the features of X: the outlier's Bx1 tile spoils one column's 128 tokens, not more
        got = {"forward y": y, "dgrad dX": dx, "wgrad dW": dw}
        for name, value in got.items():
            a, r = (value.t(), ref[name].t()) if name == "wgrad dW" else (value, ref[name])
            errors[name, scaling] = _mean_rel(a, r)
    print("\nFP8 GEMM mean relative error vs float64, outliers 1e5 x typical (B = 128):")
    for name in ref:
        print(f"  {name:9s} blockwise {errors[name, 'blockwise']:.3e}   tensorwise {errors[name, 'tensorwise']:.3e}")
    for name in ref:
        assert errors[name, "blockwise"] < errors[name, "tensorwise"]
        assert errors[name, "blockwise"] < 0.05  # E4M3's 3 mantissa bits, averaged over K
        # one tensor scale pushes every typical value into E4M3's subnormals (steps of 2^-9 * 1e5 / 448)
        assert errors[name, "tensorwise"] > 3 * errors[name, "blockwise"]


def test_without_outliers_the_error_is_e4m3_rounding():
    g = torch.Generator().manual_seed(1)
    x, w, dy = torch.randn(64, 256, generator=g), torch.randn(96, 256, generator=g), torch.randn(64, 96, generator=g)
    y, dx, dw = _grads(x, w, dy, FP8Recipe(128))
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    for got, want in ((y, x64 @ w64.t()), (dx, dy64 @ w64), (dw, dy64.t() @ x64)):
        rel = ((got.double() - want).norm() / want.norm()).item()
        assert 1e-3 < rel < 0.05  # quantised (not exact), within E4M3's relative precision 2^-4


@pytest.mark.parametrize("tensorwise", [False, True])
@pytest.mark.parametrize("pow2", [False, True])
def test_scaled_mm_and_dequant_back_ends_agree(tensorwise, pow2):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(48, 64, generator=g), torch.randn(40, 64, generator=g)  # N = 40: a partial weight block
    dy = torch.randn(48, 40, generator=g)
    outs = [_grads(x, w, dy, FP8Recipe(16, tensorwise, pow2, be)) for be in ("scaled_mm", "dequant")]
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    # grouped: the per-expert scaled_mm loop against the dequantised grouped GEMM
    load = torch.tensor([10, 0, 25, 13])
    wg = torch.randn(4, 40, 64, generator=g)
    res = []
    for be in ("scaled_mm", "dequant"):
        xx, ww = x.clone().requires_grad_(), wg.clone().requires_grad_()
        y = fp8_grouped(xx, ww, load, FP8Recipe(16, tensorwise, pow2, be))
        y.backward(dy)
        res.append((y, xx.grad, ww.grad))
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("N", [40, 18])  # 18: not a multiple of 4, so the per-expert fallback of _grouped_mm runs
def test_grouped_experts_equal_one_dense_fp8_gemm_per_expert(N):
    g = torch.Generator().manual_seed(3)
    B, K, load = 8, 32, torch.tensor([5, 0, 19, 12])  # runs not multiples of B: the wgrad pads each one
    R = int(load.sum())
    x = torch.randn(R, K, generator=g)
    w = torch.randn(4, N, K, generator=g)
    scale_E = torch.tensor([1.0, 1.0, 1e5, 1e-3])  # experts of very different magnitudes
    x = x * scale_E.repeat_interleave(load).unsqueeze(1)
    dy = torch.randn(R, N, generator=g) * scale_E.repeat_interleave(load).unsqueeze(1)
    recipe = FP8Recipe(B)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_grouped(xg, wg, load, recipe)
    y.backward(dy)
    ys, dxs, dws = [], [], []
    for e, (xe, dye) in enumerate(zip(x.split(load.tolist()), dy.split(load.tolist()), strict=True)):
        ye, dxe, dwe = _grads(xe, w[e], dye, recipe)
        ys.append(ye), dxs.append(dxe), dws.append(dwe)
    torch.testing.assert_close(y, torch.cat(ys), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xg.grad, torch.cat(dxs), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wg.grad, torch.stack(dws), rtol=1e-6, atol=1e-6)
    # the padding matters: B x 1 tiles over the unpadded rows would put expert 0's rows 0-4 in one tile with
    # expert 2's rows 5-7 (x1e5), and expert 0's values would fall into E4M3's subnormals
    straddling = FP8Recipe(B).token_major(x).dequantize()[:5]
    own = FP8Recipe(B).token_major(x[:5]).dequantize()
    assert ((straddling - x[:5]).norm() / x[:5].norm()) > 10 * ((own - x[:5]).norm() / x[:5].norm())


def test_autocast_bf16_inputs_give_bf16_outputs_and_fp32_weight_grads():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 32, generator=g, requires_grad=True)
    w = torch.randn(24, 32, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.functional.linear(x, torch.eye(32))  # an autocast op: h arrives as bfloat16
        y = fp8_linear(h, w, FP8Recipe(16))
    assert h.dtype == y.dtype == torch.bfloat16 and y.shape == (2, 8, 24)
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    want = x.detach().double() @ w.detach().double().t()
    assert ((y.double() - want).norm() / want.norm()) < 0.06  # E4M3 (2^-4) and the bf16 output rounding


def test_seeded_fp8_gemms_are_deterministic():
    def once():
        g = torch.Generator().manual_seed(5)
        x = torch.randn(37, 64, generator=g, requires_grad=True)
        w = torch.randn(3, 24, 64, generator=g, requires_grad=True)
        y = fp8_grouped(x, w, torch.tensor([10, 20, 7]), FP8Recipe(16))
        y.pow(2).sum().backward()
        return y, x.grad, w.grad

    for a, b in zip(once(), once(), strict=True):
        assert torch.equal(a, b)
