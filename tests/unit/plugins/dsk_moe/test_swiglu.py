"""The SwiGLU activation: its PyTorch node (dsk_moe.experts.swiglu_torch: autograd's gradients, keeping only its
inputs), and the CPU kernel that swiglu and swiglu_stacked (over the stacked pre-activations [g | u]) run, against
it."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from dsk_moe import kernels
from dsk_moe.experts import swiglu, swiglu_stacked, swiglu_torch


@pytest.mark.parametrize("scaled", [False, True])
def test_gradients_match_autograds_composition_and_gradcheck(scaled):
    torch.manual_seed(0)
    gate = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(9, dtype=torch.float64, requires_grad=True) if scaled else None
    inputs = (gate, up, scale) if scaled else (gate, up)
    assert torch.autograd.gradcheck(lambda *a: swiglu_torch(*a), inputs)
    want = F.silu(gate) * (up * scale.unsqueeze(-1) if scaled else up)
    got = swiglu_torch(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_only_the_inputs_are_kept_for_the_backward():
    gate = torch.randn(4, 8, requires_grad=True)
    up = torch.randn(4, 8, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        swiglu_torch(gate, up)
    assert {id(t) for t in kept} == {id(gate), id(up)}  # silu(gate) is recomputed in the backward, not kept
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        F.silu(gate) * up
    assert len(kept) == 3  # autograd's composition keeps silu(gate) as well


kernel_built = pytest.mark.skipif(
    os.environ.get("DSK_CPU_KERNELS") == "0" or kernels.EXTENSION.load() is None, reason="CPU kernels unavailable"
)


def _reference(gu, scale=None):
    # the stacked pre-activations split, through the PyTorch node (itself checked against autograd above)
    gate, up = gu.chunk(2, dim=-1)
    return swiglu_torch(gate, up, scale)


@kernel_built
@pytest.mark.parametrize("form", ["stacked", "halves", "separate"])
@pytest.mark.parametrize("scale_shape", [None, (37,), (37, 1)])
def test_kernel_equals_the_pytorch_node_float64_and_passes_gradcheck(scale_shape, form):
    """swiglu_stacked on [g | u]; swiglu on its two halves (views with a row stride of 2H), or on two tensors."""
    torch.manual_seed(1)
    gu = torch.randn(37, 2 * 20, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(scale_shape, dtype=torch.float64, requires_grad=True) if scale_shape else None
    if form == "separate":
        gate = torch.randn(37, 20, dtype=torch.float64, requires_grad=True)
        up = torch.randn(37, 20, dtype=torch.float64, requires_grad=True)
        leaves, fn, ref = (gate, up), (lambda g, u, *s: swiglu(g, u, *s)), (lambda g, u, *s: swiglu_torch(g, u, *s))
    elif form == "halves":
        leaves, fn = (gu,), (lambda x, *s: swiglu(*x.chunk(2, dim=-1), *s))
        ref = lambda x, *s: swiglu_torch(*x.chunk(2, dim=-1), *s)  # noqa: E731
    else:
        leaves, fn, ref = (gu,), (lambda x, *s: swiglu_stacked(x, *s)), (lambda x, *s: _reference(x, *s))
    inputs = leaves if scale is None else (*leaves, scale)
    got = fn(*inputs)
    node = got.grad_fn if got.grad_fn.name().endswith("_SwiGLUKernelBackward") else got.grad_fn.next_functions[0][0]
    assert node.name().endswith("_SwiGLUKernelBackward")  # the kernel's node, not the composition
    want = ref(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    assert torch.autograd.gradcheck(fn, inputs)


@kernel_built
def test_stacked_kernel_float32_over_the_whole_range_and_any_thread_count():
    # pre-activations from -90 to 90 (the vectorised exp clamps its input) against a float64 reference
    gu = torch.linspace(-90, 90, 2 * 3 * 1000, dtype=torch.float64).reshape(-1, 2 * 1000)[:, torch.randperm(2000)]
    gu = gu.repeat(700, 1)  # enough rows for the threads to split them
    scale = torch.rand(gu.shape[0], dtype=torch.float64)
    dy = torch.randn(gu.shape[0], 1000, dtype=torch.float64)
    g64, s64 = gu.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    want = _reference(g64, s64)
    want_grads = torch.autograd.grad(want, (g64, s64), dy)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            g32, s32 = gu.float().requires_grad_(True), scale.float().requires_grad_(True)
            got = swiglu_stacked(g32, s32)
            results.append((got.detach(), *torch.autograd.grad(got, (g32, s32), dy.float())))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0], results[1], strict=True):
        assert torch.equal(a, b)  # rows are independent: the split over threads changes nothing
    out, d_gu, d_scale = (t.double() for t in results[0])
    torch.testing.assert_close(out, want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(d_gu, want_grads[0], rtol=2e-6, atol=1e-5)
    # d_scale sums H = 1000 products of up to ~1e4: float32 rounding of that sum, relative to its terms' magnitudes
    gate, up = gu.chunk(2, dim=-1)
    magnitude = (dy.abs() * F.silu(gate).abs() * up.abs()).sum(-1)
    assert ((d_scale - want_grads[1]).abs() <= 1e-5 * magnitude).all()


@kernel_built
def test_stacked_kernel_keeps_only_its_inputs_and_runs_without_grad():
    gu = torch.randn(5, 16, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        swiglu_stacked(gu)
    assert len(kept) == 2 and kept[1].numel() == 0  # gu (as a [R, 2H] view of itself) and the empty scale
    assert kept[0].data_ptr() == gu.data_ptr() and kept[0].shape == gu.shape
    with torch.no_grad():
        out = swiglu_stacked(gu)
    assert out.grad_fn is None
    torch.testing.assert_close(out, _reference(gu.detach(), None), rtol=1e-6, atol=1e-7)


def test_stacked_falls_back_to_the_pytorch_node_where_the_kernel_cannot_run():
    gu = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    got = swiglu_stacked(gu)
    assert got.grad_fn.name().endswith("_SwiGLUBackward")
    torch.testing.assert_close(got, _reference(gu, None), rtol=0, atol=0)
