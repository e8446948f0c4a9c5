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
