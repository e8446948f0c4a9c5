"""The fused CPU RMSNorm (dsk/model/csrc/rms_norm.cpp) against the PyTorch composition, and the module's two paths."""

from __future__ import annotations

import os

import pytest
import torch

from dsk.extension import cpu_kernel_supports
from dsk.model import norm as kernels
from dsk.model.norm import RMSNorm

pytestmark = pytest.mark.skipif(os.environ.get("DSK_CPU_KERNELS") == "0", reason="CPU kernels disabled")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert kernels.EXTENSION.load() is not None, kernels.EXTENSION.status()  # a build failure fails the suite


def reference(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def grads(fn, x, w, dy):
    y = fn(x, w)
    return (y.detach(), *torch.autograd.grad(y, (x, w), dy))


@pytest.mark.parametrize("shape", [(3, 5, 16), (1, 7), (64, 384)])
def test_kernel_matches_the_composition_in_float64(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(shape[-1], generator=g, dtype=torch.float64).requires_grad_(True)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    got = grads(lambda a, b: kernels.rms_norm_kernel(a, b, 1e-6), x, w, dy)
    want = grads(lambda a, b: reference(a, b, 1e-6), x, w, dy)
    for name, a, b in zip(["y", "dx", "dw"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_kernel_float32_and_strided_input_match_the_float64_composition():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 40, 70, generator=g, dtype=torch.float64)
    w = torch.randn(64, generator=g, dtype=torch.float64)
    dy = torch.randn(8, 40, 64, generator=g, dtype=torch.float64)
    x32 = base.float()[..., 3:67].requires_grad_(True)  # a non-contiguous view
    got = grads(lambda a, b: kernels.rms_norm_kernel(a, b, 1e-5), x32, w.float().requires_grad_(True), dy.float())
    x64 = base[..., 3:67].clone().requires_grad_(True)
    want = grads(lambda a, b: reference(a, b, 1e-5), x64, w.clone().requires_grad_(True), dy)
    for a, b in zip(got, want, strict=True):
        assert (a.double() - b).abs().max() <= 2e-6 * b.abs().max()


def test_module_uses_the_kernel_and_matches_its_pytorch_path(monkeypatch):
    norm = RMSNorm(32, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 6, 32, dtype=torch.float64, requires_grad=True)
    calls = []
    real = kernels.rms_norm_kernel
    monkeypatch.setattr(kernels, "rms_norm_kernel", lambda *a: calls.append(1) or real(*a))
    fused = norm(x)
    fused.sum().backward()
    fused_grads = x.grad.clone(), norm.weight.grad.clone()
    assert calls, "RMSNorm did not take the kernel for float64 on CPU"
    x.grad, norm.weight.grad = None, None
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    plain = norm(x)
    plain.sum().backward()
    assert len(calls) == 1
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_grads[0], x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_grads[1], norm.weight.grad, rtol=1e-12, atol=1e-12)


def test_bfloat16_takes_the_pytorch_path():
    norm = RMSNorm(16).to(torch.bfloat16)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert not cpu_kernel_supports(x, norm.weight.float())
    assert norm(x).dtype == torch.bfloat16
