"""The CPU routed-expert kernel (dsk_moe/csrc/experts.cpp) against the float64 per-expert loop reference."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from dsk_moe import kernels as cpu_kernel

from .test_moe import DIM, forward_backward, make_moe, reference_moe

pytestmark = pytest.mark.skipif(os.environ.get("DSK_CPU_KERNELS") == "0", reason="CPU kernels disabled")


@pytest.fixture(scope="module")
def kernel():
    module = cpu_kernel.EXTENSION.load()
    assert module is not None, cpu_kernel.EXTENSION.status()  # a build failure must fail the suite, not skip it
    return module


def loop_experts(x, load, w_gate, w_up, w_down, scale):
    outs = []
    for xe, se, wg, wu, wd in zip(
        x.split(load.tolist()), scale.split(load.tolist()), w_gate, w_up, w_down, strict=True
    ):
        outs.append((F.silu(xe @ wg.t()) * (xe @ wu.t()) * se[:, None]) @ wd.t())
    return torch.cat(outs)


def random_problem(dtype, n_rows=300, n_experts=9, dim=24, hidden=12, idle=(3, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    expert = torch.randint(0, n_experts, (n_rows,), generator=g)
    for e in idle:
        expert[expert == e] = (e + 1) % n_experts
    load = torch.bincount(expert, minlength=n_experts)

    def param(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)

    return (
        load,
        param(n_rows, dim),
        param(n_experts, hidden, dim),
        param(n_experts, hidden, dim),
        param(n_experts, dim, hidden),
        param(n_rows),
    )


def grads(fn, inputs, dy):
    y = fn(*inputs)
    return (y.detach(), *torch.autograd.grad(y, [t for t in inputs if torch.is_tensor(t) and t.requires_grad], dy))


def test_kernel_forward_and_backward_match_the_loop_in_float64(kernel):
    load, x, wg, wu, wd, s = random_problem(torch.float64)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    got = grads(lambda *a: cpu_kernel.experts_cpu(a[0], load, *a[1:]), (x, wg, wu, wd, s), dy)
    want = grads(lambda *a: loop_experts(a[0], load, *a[1:]), (x, wg, wu, wd, s), dy)
    for name, a, b in zip(["y", "dx", "dw_gate", "dw_up", "dw_down", "dscale"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    idle = load == 0
    assert idle.sum() == 2 and got[2][idle].abs().sum() == 0 and got[4][idle].abs().sum() == 0


def test_kernel_float32_matches_the_float64_loop(kernel):
    load, x, wg, wu, wd, s = random_problem(torch.float64, seed=1)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    f32 = [t.detach().float().requires_grad_(True) for t in (x, wg, wu, wd, s)]
    got = grads(lambda *a: cpu_kernel.experts_cpu(a[0], load, *a[1:]), f32, dy.float())
    want = grads(lambda *a: loop_experts(a[0], load, *a[1:]), (x, wg, wu, wd, s), dy)
    for a, b in zip(got, want, strict=True):
        # float32 rounding relative to the tensor's scale (unit-normal weights give entries in the hundreds)
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_kernel_without_scale_and_without_grad(kernel):
    load, x, wg, wu, wd, _ = random_problem(torch.float64, seed=2)
    ones = torch.ones(x.shape[0], dtype=x.dtype)
    with torch.no_grad():
        got = cpu_kernel.experts_cpu(x, load, wg, wu, wd, None)
    torch.testing.assert_close(got, loop_experts(x, load, wg, wu, wd, ones).detach(), rtol=1e-12, atol=1e-12)
    assert not got.requires_grad


def test_kernel_result_does_not_depend_on_the_thread_count(kernel):
    # Each expert's GEMMs run on one thread whatever the split, so the bits are the same for 1 and 2 threads.
    load, x, wg, wu, wd, s = random_problem(torch.float32, n_rows=2000, n_experts=16, seed=3)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(grads(lambda *a: cpu_kernel.experts_cpu(a[0], load, *a[1:]), (x, wg, wu, wd, s), dy))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_groups,topk_groups", [(1, 1), (3, 2)])
def test_moe_layer_with_the_cpu_kernel_matches_the_per_expert_reference_float64(kernel, n_groups, topk_groups):
    moe = make_moe("cpu_kernel", n_groups=n_groups, topk_groups=topk_groups).eval()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    y, gx, g = forward_backward(moe, x, lambda m, v: m(v))
    y_ref, gx_ref, g_ref = forward_backward(moe, x, reference_moe)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-12, atol=1e-12, msg=name)


def test_forced_cpu_kernel_on_an_unsupported_dtype_raises_naming_the_key(kernel):
    moe = make_moe("cpu_kernel", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"ffn\.dispatch = 'cpu_kernel'.*bfloat16"):
        moe(torch.randn(1, 3, DIM, dtype=torch.bfloat16))


def test_bad_inputs_are_refused_by_the_kernel(kernel):
    load, x, wg, wu, wd, s = (
        t.detach() if torch.is_tensor(t) and t.is_floating_point() else t for t in random_problem(torch.float64)
    )
    order = torch.arange(x.shape[0])
    starts = torch.zeros(load.numel() + 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="from 0 to R"):
        kernel.experts_forward(x, order, starts, 1, s, wg, wu, wd)
    torch.cumsum(load, 0, out=starts[1:])
    with pytest.raises(RuntimeError, match="w_down must be"):
        kernel.experts_forward(x, order, starts, 1, s, wg, wu, wg)
    with pytest.raises(RuntimeError, match="E \\+ 1 offsets"):
        kernel.experts_forward(x, order, starts[:-1], 1, s, wg, wu, wd)
    with pytest.raises(RuntimeError, match="slot outside"):
        kernel.experts_forward(x, order + 1, starts, 1, s, wg, wu, wd)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernel.experts_forward(x, order, starts, 2, s, wg, wu, wd)


@pytest.mark.parametrize("routed_share", [1.0, 0.6], ids=["all_slots", "some_slots_unrouted"])
def test_routed_experts_gather_and_combine_match_a_per_slot_loop_float64(kernel, routed_share):
    g = torch.Generator().manual_seed(4)
    n, k, n_experts, dim, hidden = 40, 3, 7, 16, 8
    slots = torch.randperm(n * k, generator=g)[: int(n * k * routed_share)]
    expert_of_slot = torch.randint(0, n_experts, (slots.numel(),), generator=g)
    by_expert = torch.argsort(expert_of_slot, stable=True)
    order, load = slots[by_expert], torch.bincount(expert_of_slot, minlength=n_experts)

    def param(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    x, weights, wg, wu, wd = (
        param(n, dim),
        param(n, k),
        param(n_experts, hidden, dim),
        param(n_experts, hidden, dim),
        param(n_experts, dim, hidden),
    )

    def loop(x, weights, wg, wu, wd):
        y = torch.zeros_like(x)
        for slot, e in zip(slots.tolist(), expert_of_slot.tolist(), strict=True):
            t = slot // k
            h = F.silu(x[t] @ wg[e].t()) * (x[t] @ wu[e].t()) * weights.reshape(-1)[slot]
            y = y.index_add(0, torch.tensor([t]), (h @ wd[e].t())[None])
        return y

    dy = torch.randn(n, dim, generator=g, dtype=torch.float64)
    inputs = (x, weights, wg, wu, wd)
    got = grads(lambda *a: cpu_kernel.routed_experts(a[0], a[1], order, load, *a[2:], k=k), inputs, dy)
    want = grads(loop, inputs, dy)
    for name, a, b in zip(["y", "dx", "dweights", "dw_gate", "dw_up", "dw_down"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_float32_activation_is_accurate_over_the_whole_range(kernel):
    # pre-activations from -120 to 120: the vectorised float32 exp clamps and rounds but must stay at float32
    # accuracy, including where sigmoid saturates to 0 or 1
    g = torch.linspace(-120, 120, 4001, dtype=torch.float64)
    x = torch.stack([g, torch.ones_like(g)], dim=1)  # [R, 2]: the gate reads column 0, up reads column 1
    w_gate = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    w_up = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    w_down = torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)
    load = torch.tensor([x.shape[0]])
    got = cpu_kernel.experts_cpu(x.float(), load, w_gate.float(), w_up.float(), w_down.float(), None)[:, 0]
    want = F.silu(g.float()).double()  # the same float32 inputs through ATen's silu
    assert ((got.double() - want).abs() <= 1e-6 * want.abs() + 1e-35).all()
