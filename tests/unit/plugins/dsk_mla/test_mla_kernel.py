"""MLA's fused CPU attention core (dsk_mla.kernels.mla_attention): gradients and the layer against its PyTorch path."""

from __future__ import annotations

import os

import pytest
import torch
from dsk_mla import kernels

from .test_mla import CASES, inputs, make_mla

pytestmark = pytest.mark.skipif(os.environ.get("DSK_CPU_KERNELS") == "0", reason="CPU kernels disabled")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert kernels.EXTENSION.load() is not None, kernels.EXTENSION.status()  # a build failure fails the suite


def reference(q_nope, q_pe, k_nope, k_pe, v, scale):
    T = q_nope.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
    scores = (scores * scale).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def operands(dtype=torch.float64, B=2, T=6, H=3, dn=4, dr=2, dv=3):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, dn + dr, generator=g, dtype=dtype)
    kv = torch.randn(B, T, H, dn + dv, generator=g, dtype=dtype)
    latent = torch.randn(B, T, 5 + dr, generator=g, dtype=dtype)
    # strided views, as the layer passes them: splits of the projections' outputs
    leaves = [t.requires_grad_(True) for t in (q, kv, latent)]
    q_nope, q_pe = leaves[0].split([dn, dr], -1)
    k_nope, v = leaves[1].split([dn, dv], -1)
    k_pe = leaves[2][..., 5:]
    return leaves, (q_nope, q_pe.contiguous(), k_nope, k_pe, v)


@pytest.mark.parametrize("T", [6, 64, 150], ids=["one_block", "exact_block", "three_blocks"])
def test_forward_and_backward_match_the_einsum_reference_float64(T):
    # the kernel walks the queries in causal blocks of 64 rows: 150 = two full blocks and a partial one
    leaves, ops = operands(T=T)
    dy = torch.randn(2, T, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = kernels.mla_attention(*ops, 0.7)
    grads = torch.autograd.grad(got, leaves, dy)
    want = reference(*ops, 0.7)
    want_grads = torch.autograd.grad(want, leaves, dy)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    leaves, _ = operands(T=4, H=2)
    torch.autograd.gradcheck(
        lambda q, kv, lat: kernels.mla_attention(q[..., :4], q[..., 4:], kv[..., :4], lat[..., 5:], kv[..., 4:], 0.5),
        leaves,
    )


@pytest.mark.parametrize("q_lora_rank,yarn", CASES)
def test_layer_with_the_kernel_equals_its_pytorch_path(monkeypatch, q_lora_rank, yarn):
    m = make_mla(q_lora_rank, yarn)
    x, pos = inputs()
    calls = []
    real = kernels.mla_attention
    monkeypatch.setattr(kernels, "mla_attention", lambda *a: calls.append(1) or real(*a))

    def run():
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y = m(xx, pos)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        return y.detach(), xx.grad, {n: p.grad.clone() for n, p in m.named_parameters()}

    fused = run()
    assert calls, "the layer did not take the kernel for a short causal float64 sequence on CPU"
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    plain = run()
    assert len(calls) == 1
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-12, atol=1e-12)
    for name in plain[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], rtol=1e-10, atol=1e-12, msg=name)


def test_float32_matches_float64():
    leaves, ops = operands()
    got = kernels.mla_attention(*[t.detach().float() for t in ops], 0.7)
    torch.testing.assert_close(got.double(), reference(*ops, 0.7).detach(), rtol=1e-5, atol=1e-6)


def test_broadcast_operands_are_copied_before_blas_reads_them():
    _, ops = operands(T=5)
    q_nope, q_pe, k_nope, k_pe, v = (t.detach() for t in ops)
    shared_v = v[:, :1].expand_as(v)  # every position the same value row: stride 0 over T
    got = kernels.mla_attention(q_nope, q_pe, k_nope, k_pe, shared_v, 0.7)
    torch.testing.assert_close(got, reference(q_nope, q_pe, k_nope, k_pe, shared_v, 0.7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_small_gemm_matches_matmul_for_every_layout(dtype, ta, tb):
    # the register-blocked kernel the attention runs its small products in: row blocks of 6 and column blocks of
    # 64 bytes with their remainders, operands rows further apart than their width (strided views), k = 0 and 1,
    # overwrite and accumulate
    ext = kernels.EXTENSION.load()
    g = torch.Generator().manual_seed(0)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for m, n, k in [(1, 1, 1), (5, 7, 3), (6, 16, 8), (13, 33, 17), (64, 64, 16), (70, 20, 0), (7, 9, 1), (64, 8, 64)]:

        def stored(rows, cols):  # a [rows, cols] view of a wider buffer
            return torch.randn(rows, cols + 5, generator=g, dtype=dtype)[:, 2 : 2 + cols]

        a = stored(k, m) if ta else stored(m, k)
        b = stored(n, k) if tb else stored(k, n)
        want = (a.T if ta else a) @ (b.T if tb else b)
        for accumulate in (False, True):
            c = stored(m, n)
            c0 = c.clone()
            got = ext.small_gemm(a, b, c, ta, tb, accumulate)
            torch.testing.assert_close(got, want + c0 if accumulate else want, **tol, msg=f"{m}x{n}x{k}")
            assert got.data_ptr() == c.data_ptr()


# -- the absorbed decode kernel (dsk_mla.kernels.absorbed_decode) ------------------------------------------------


def _decode_steps(m, dtype):
    """Cached decoding through the layer: a prefill that leaves the rows at lengths 7, 4 and 9 (ragged, so the
    steps carry masks), then one-token and three-token steps (a speculative verify's shape) -> the outputs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, m.dim, generator=g, dtype=dtype)
    cache = m.make_cache(3, 20, dtype=dtype)
    outs = []
    with torch.no_grad():
        outs.append(m(x, torch.arange(9), cache=cache))
        cache.truncate(torch.tensor([7, 4, 9]))
        for T in (1, 3, 1):
            step = torch.randn(3, T, m.dim, generator=g, dtype=dtype)
            outs.append(m(step, cache.positions(T), cache=cache))
        cache.truncate(5)  # equal rows again: no mask, causal by slot from the common offset
        for T in (1, 2):
            step = torch.randn(3, T, m.dim, generator=g, dtype=dtype)
            outs.append(m(step, cache.positions(T), cache=cache))
    return outs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("q_lora_rank,yarn", CASES)
def test_cached_decoding_with_the_absorbed_kernel_equals_its_pytorch_path(monkeypatch, dtype, q_lora_rank, yarn):
    m = make_mla(q_lora_rank, yarn).to(dtype)
    calls = []
    real = kernels.absorbed_decode
    monkeypatch.setattr(kernels, "absorbed_decode", lambda *a: calls.append(1) or real(*a))
    fused = _decode_steps(m, dtype)
    # every step, and the prefill too: at these sizes (c = 10) absorbing is cheaper even for 9 queries
    assert len(calls) == 6, "every absorbed step of a float CPU latent cache should take the kernel"
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    plain = _decode_steps(m, dtype)
    assert len(calls) == 6
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_absorbed_kernel_masks_and_a_query_that_sees_nothing():
    g = torch.Generator().manual_seed(0)
    B, T, H, dn, dr, dv, c, S = 2, 2, 3, 4, 2, 5, 6, 7
    q_nope = torch.randn(B, T, H, dn, generator=g, dtype=torch.float64)
    q_pe = torch.randn(B, T, H, dr, generator=g, dtype=torch.float64)
    kv = torch.randn(B, 10, c + dr, generator=g, dtype=torch.float64)[:, :S]  # a cache's view: rows 10 slots apart
    w = torch.randn(H * (dn + dv), c, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, S, generator=g) < 0.6
    mask[1, 0] = False  # sees no key: zeros, not NaN
    got = kernels.absorbed_decode(q_nope, q_pe, kv, w, mask, 0, 0.4)
    w_uk, w_uv = w.view(H, dn + dv, c)[:, :dn], w.view(H, dn + dv, c)[:, dn:]
    q_c = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
    scores = (
        torch.einsum("bthc,bsc->bhts", q_c, kv[..., :c]) + torch.einsum("bthd,bsd->bhts", q_pe, kv[..., c:])
    ) * 0.4
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    want = torch.einsum("bhts,bsc,hec->bthe", probs, kv[..., :c], w_uv)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1, 0], torch.zeros(H, dv, dtype=torch.float64))
    # without a mask: causal by slot, query t sees keys 0 .. offset + t
    causal = torch.arange(S)[None, :] <= 4 + torch.arange(T)[:, None]
    torch.testing.assert_close(
        kernels.absorbed_decode(q_nope, q_pe, kv, w, None, 4, 0.4),
        kernels.absorbed_decode(q_nope, q_pe, kv, w, causal.expand(B, T, S).contiguous(), 0, 0.4),
        rtol=0,
        atol=0,
    )
