"""MoE layer: vectorised dispatch against a per-expert loop reference, side channels, HF name mapping."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from dsk_moe.config import DenseConfig, MoEConfig, NoauxTCConfig
from dsk_moe.experts import Dense, grouped_mm_supported
from dsk_moe.moe import MoE, dsk_to_hf, hf_to_dsk
from dsk_moe.router import NoauxTCRouter

from dsk.api import ModelContext, ResolvedSlot

DIM, HIDDEN = 8, 4  # multiples of 16 bytes in float32, so grouped_mm runs on CPU


def make_moe(
    dispatch="auto",
    n_experts=6,
    n_shared=2,
    top_k=2,
    n_groups=1,
    topk_groups=1,
    seq_aux_alpha=1e-2,
    dtype=torch.float64,
    seed=0,
):
    router_cfg = NoauxTCConfig(
        top_k=top_k, n_groups=n_groups, topk_groups=topk_groups, route_scale=2.5, seq_aux_alpha=seq_aux_alpha
    )
    cfg = MoEConfig(
        n_routed_experts=n_experts,
        n_shared_experts=n_shared,
        expert_hidden_dim=HIDDEN,
        dispatch=dispatch,
        router=ResolvedSlot(kind="router", name="noaux_tc", config=router_cfg, impl=NoauxTCRouter),
    )
    torch.manual_seed(seed)
    ctx = ModelContext(dim=DIM, n_layers=1, vocab_size=16, max_seq_len=16, init_std=0.5)
    moe = MoE(cfg, ctx).to(dtype)
    moe.gate.e_score_correction_bias.copy_(torch.randn(n_experts) * 0.1)
    return moe


def reference_moe(moe: MoE, x_BTD: torch.Tensor) -> torch.Tensor:
    """The obvious per-expert loop (as in the DeepSeek reference inference MoE), routing from moe.gate."""
    B, T, D = x_BTD.shape
    x = x_BTD.reshape(B * T, D)
    weights, idx, _ = moe.gate(x, seq_shape=(B, T))
    y = torch.zeros_like(x)
    ex = moe.experts
    for e in range(ex.n_experts):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        h = F.linear(F.silu(F.linear(x[tok], ex.w_gate[e])) * F.linear(x[tok], ex.w_up[e]), ex.w_down[e])
        y = y.index_add(0, tok, h * weights[tok, slot, None])
    sh = moe.shared_experts
    y = y + sh.down_proj(F.silu(sh.gate_proj(x)) * sh.up_proj(x))
    return y.view(B, T, D)


def forward_backward(moe, x, fn):
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(moe, x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in moe.named_parameters()}
    return y.detach(), x.grad.detach().clone(), grads


@pytest.mark.parametrize("n_groups,topk_groups", [(1, 1), (3, 2)])
def test_loop_slices_forward_and_backward_match_per_expert_reference_float64(n_groups, topk_groups):
    moe = make_moe("loop_slices", n_groups=n_groups, topk_groups=topk_groups).eval()
    x = torch.randn(2, 5, DIM, dtype=torch.float64)
    y, gx, g = forward_backward(moe, x, lambda m, v: m(v))
    y_ref, gx_ref, g_ref = forward_backward(moe, x, reference_moe)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    assert (
        set(g)
        == set(g_ref)
        == {
            "gate.weight",
            "experts.w_gate",
            "experts.w_up",
            "experts.w_down",
            "shared_experts.gate_proj.weight",
            "shared_experts.up_proj.weight",
            "shared_experts.down_proj.weight",
        }
    )
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm not in this torch build")
def test_grouped_mm_forward_and_backward_match_float64_reference():
    # torch._grouped_mm has no float64 kernel: run it in float32 against the float64 reference of the same weights.
    moe64 = make_moe("loop_slices").eval()
    moe32 = make_moe("grouped_mm", dtype=torch.float32).eval()
    moe32.load_state_dict({k: v.float() for k, v in moe64.state_dict().items()})
    x = torch.randn(3, 4, DIM, dtype=torch.float64)
    assert moe32.experts.resolve_dispatch(x.float().reshape(-1, DIM), "grouped_mm") == "grouped_mm"
    y, gx, g = forward_backward(moe32, x.float(), lambda m, v: m(v))
    y_ref, gx_ref, g_ref = forward_backward(moe64, x, reference_moe)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)
    for name in g:
        torch.testing.assert_close(g[name].double(), g_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_experts_without_tokens_get_zero_gradient_in_every_dispatch_mode():
    cases = [("loop_slices", torch.float64), ("auto", torch.float32)]
    if os.environ.get("DSK_CPU_KERNELS") != "0":
        cases.append(("cpu_kernel", torch.float64))
    if grouped_mm_supported(torch.zeros(1, DIM), torch.zeros(1, HIDDEN, DIM)):
        cases.append(("grouped_mm", torch.float32))
    for dispatch, dtype in cases:
        moe = make_moe(dispatch, n_experts=16, top_k=1, dtype=dtype).eval()
        x = torch.randn(1, 2, DIM, dtype=dtype)  # 2 tokens x top-1: at least 14 experts idle
        moe(x).sum().backward()
        idle = moe.gate(x.view(2, DIM))[2]["load"] == 0
        assert idle.sum() >= 14
        assert moe.experts.w_gate.grad[idle].abs().sum() == 0


@pytest.mark.skipif(os.environ.get("DSK_CPU_KERNELS") == "0", reason="CPU kernels disabled")
def test_dispatch_auto_takes_the_cpu_kernel_for_small_experts_else_grouped_mm_or_slices(monkeypatch):
    from dsk_moe import experts, kernels

    moe = make_moe("auto")
    x64 = torch.randn(4, DIM, dtype=torch.float64)
    assert moe.experts.resolve_dispatch(x64, "auto") == "cpu_kernel"
    # experts averaging more rows than the threshold: ATen's multi-threaded GEMMs (grouped_mm has no float64)
    monkeypatch.setattr(experts, "CPU_KERNEL_MAX_MEAN_ROWS", 0)
    assert moe.experts.resolve_dispatch(x64, "auto") == "loop_slices"
    moe32 = make_moe("auto", dtype=torch.float32)
    expected = "grouped_mm" if grouped_mm_supported(x64.float(), moe32.experts.w_gate) else "loop_slices"
    assert moe32.experts.resolve_dispatch(x64.float(), "auto") == expected
    monkeypatch.setattr(experts, "CPU_KERNEL_MAX_MEAN_ROWS", 384)
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    assert kernels.EXTENSION.load() is None
    assert moe.experts.resolve_dispatch(x64, "auto") == "loop_slices"
    with pytest.raises(ValueError, match=r"ffn\.dispatch = 'cpu_kernel'.*DSK_CPU_KERNELS=0"):
        moe.experts.resolve_dispatch(x64, "cpu_kernel")


def test_forced_grouped_mm_on_unsupported_dtype_raises_naming_the_key():
    moe = make_moe("grouped_mm")
    with pytest.raises(ValueError, match=r"ffn\.dispatch = 'grouped_mm'.*float64"):
        moe(torch.randn(1, 3, DIM, dtype=torch.float64))


def test_moe_without_shared_experts():
    moe = make_moe("loop_slices", n_shared=0).eval()
    assert moe.shared_experts is None
    x = torch.randn(1, 3, DIM, dtype=torch.float64)
    w, idx, _ = moe.gate(x.view(3, DIM))
    ex = moe.experts
    expected = torch.stack(
        [
            sum(
                w[t, k]
                * F.linear(F.silu(F.linear(x[0, t], ex.w_gate[e])) * F.linear(x[0, t], ex.w_up[e]), ex.w_down[e])
                for k, e in enumerate(idx[t].tolist())
            )
            for t in range(3)
        ]
    )
    torch.testing.assert_close(moe(x)[0], expected)


def test_side_channels_delegate_to_router_and_are_found_once_when_walking_modules():
    moe = make_moe("loop_slices", seq_aux_alpha=0.5).train()
    x = torch.randn(2, 3, DIM, dtype=torch.float64)
    moe(x)
    owners = {
        name: [m for m in moe.modules() if hasattr(m, name)]
        for name in ("aux_loss", "step_stat_tensors", "after_optimizer_step", "step_metrics")
    }
    assert all(found == [moe] for found in owners.values())
    assert moe.aux_loss() is moe.gate.balance_loss()
    assert moe.step_stat_tensors()[0] is moe.gate.step_load
    assert moe.step_stat_tensors()[0].sum().item() == 2 * 3 * 2
    assert set(moe.step_metrics()) == {"maxvio", "expert_load"}
    bias_before = moe.gate.e_score_correction_bias.clone()
    moe.after_optimizer_step()
    assert not torch.equal(moe.gate.e_score_correction_bias, bias_before)
    assert moe.step_stat_tensors()[0].sum().item() == 0


def test_state_dict_names_follow_hf_and_round_trip_through_per_expert_keys():
    moe = make_moe("loop_slices", n_experts=4)
    sd = moe.state_dict()
    assert set(sd) == {
        "gate.weight",
        "gate.e_score_correction_bias",
        "experts.w_gate",
        "experts.w_up",
        "experts.w_down",
        "shared_experts.gate_proj.weight",
        "shared_experts.up_proj.weight",
        "shared_experts.down_proj.weight",
    }
    hf = dsk_to_hf({f"model.layers.3.mlp.{k}": v for k, v in sd.items()})
    assert hf["model.layers.3.mlp.experts.2.down_proj.weight"].shape == (DIM, HIDDEN)
    assert torch.equal(hf["model.layers.3.mlp.experts.1.gate_proj.weight"], sd["experts.w_gate"][1])
    assert "model.layers.3.mlp.shared_experts.gate_proj.weight" in hf
    back = hf_to_dsk(hf)
    assert set(back) == {f"model.layers.3.mlp.{k}" for k in sd}
    for k, v in sd.items():
        assert torch.equal(back[f"model.layers.3.mlp.{k}"], v)


def test_hf_to_dsk_reports_a_missing_expert():
    hf = {f"experts.{j}.up_proj.weight": torch.zeros(2, 2) for j in (0, 2)}
    with pytest.raises(KeyError, match=r"experts\.1\.up_proj\.weight"):
        hf_to_dsk(hf)


def test_dense_is_a_swiglu_with_hf_names():
    torch.manual_seed(0)
    dense = Dense(DenseConfig(hidden_dim=12), ModelContext(dim=DIM, n_layers=1, vocab_size=16, max_seq_len=16))
    assert {k: tuple(v.shape) for k, v in dense.state_dict().items()} == {
        "gate_proj.weight": (12, DIM),
        "up_proj.weight": (12, DIM),
        "down_proj.weight": (DIM, 12),
    }
    x = torch.randn(2, 3, DIM)
    expected = dense.down_proj(F.silu(dense.gate_proj(x)) * dense.up_proj(x))
    torch.testing.assert_close(dense(x), expected)
    assert dense.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.3)


def test_after_optimizer_step_leaves_gradients_untouched():
    moe = make_moe("loop_slices", seq_aux_alpha=0.5).train()
    x = torch.randn(2, 3, DIM, dtype=torch.float64)
    (moe(x).sum() + moe.aux_loss()).backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.after_optimizer_step()
    for n, p in moe.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    assert not any(p is moe.gate.e_score_correction_bias for p in moe.parameters())
