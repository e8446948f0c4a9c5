"""The SwiGLU activation node (dsk_moe.experts.swiglu): autograd's gradients, keeping only its inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dsk_moe.experts import swiglu


@pytest.mark.parametrize("scaled", [False, True])
def test_gradients_match_autograds_composition_and_gradcheck(scaled):
    torch.manual_seed(0)
    gate = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(9, dtype=torch.float64, requires_grad=True) if scaled else None
    inputs = (gate, up, scale) if scaled else (gate, up)
    assert torch.autograd.gradcheck(lambda *a: swiglu(*a), inputs)
    want = F.silu(gate) * (up * scale.unsqueeze(-1) if scaled else up)
    got = swiglu(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_only_the_inputs_are_kept_for_the_backward():
    gate = torch.randn(4, 8, requires_grad=True)
    up = torch.randn(4, 8, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        swiglu(gate, up)
    assert {id(t) for t in kept} == {id(gate), id(up)}  # silu(gate) is recomputed in the backward, not kept
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        F.silu(gate) * up
    assert len(kept) == 3  # autograd's composition keeps silu(gate) as well
