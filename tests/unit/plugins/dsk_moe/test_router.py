"""Routers of dsk_moe: selection and weights against a float64 per-token reference, bias balancing, losses."""

from __future__ import annotations

import math

import pytest
import torch
from dsk_moe.config import AuxLossConfig, GreedyConfig, NoauxTCConfig
from dsk_moe.router import AuxLossRouter, GreedyRouter, NoauxTCRouter

from dsk.api import ModelContext


def make_router(cls, cfg, n_experts: int, dim: int = 8, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    ctx = ModelContext(dim=dim, n_layers=1, vocab_size=16, max_seq_len=16, init_std=0.5)
    return cls(cfg, ctx, n_experts).to(dtype)


def reference_route(x, weight, bias, *, top_k, score_func, n_groups, topk_groups, group_score, norm, scale):
    """Per-token float64 reference of DeepSeek-V3 routing, written from spec §1.7 without the module's code.

    Returns one dict {expert: weight} per token.
    """
    n_experts = weight.shape[0]
    per_group = n_experts // n_groups
    out = []
    for t in range(x.shape[0]):
        logits = [float(torch.dot(weight[e], x[t])) for e in range(n_experts)]
        if score_func == "sigmoid":
            s = [1.0 / (1.0 + math.exp(-v)) for v in logits]
        else:
            m = max(logits)
            z = sum(math.exp(v - m) for v in logits)
            s = [math.exp(v - m) / z for v in logits]
        c = [s[e] + float(bias[e]) for e in range(n_experts)]
        allowed = list(range(n_experts))
        if n_groups > 1:

            def gscore(g, c=c):
                vals = sorted(c[g * per_group : (g + 1) * per_group], reverse=True)
                return vals[0] + vals[1] if group_score == "top2_sum" else vals[0]

            kept = sorted(range(n_groups), key=lambda g: -gscore(g))[:topk_groups]
            allowed = [e for e in range(n_experts) if e // per_group in kept]
        chosen = sorted(allowed, key=lambda e: -c[e])[:top_k]
        w = [s[e] for e in chosen]
        if norm:
            total = sum(w)
            w = [v / total for v in w]
        out.append({e: v * scale for e, v in zip(chosen, w, strict=True)})
    return out


def as_dicts(weights_NK, idx_NK):
    return [dict(zip(i.tolist(), w.tolist(), strict=True)) for w, i in zip(weights_NK, idx_NK, strict=True)]


NOAUX_CASES = [
    # score_func, n_groups, topk_groups, group_score, norm, scale, top_k
    ("sigmoid", 4, 2, "top2_sum", True, 2.5, 3),
    ("sigmoid", 4, 2, "top2_sum", False, 1.0, 2),
    ("sigmoid", 4, 1, "max", True, 1.0, 2),
    ("softmax", 4, 2, "top2_sum", True, 0.5, 3),
    ("softmax", 1, 1, "top2_sum", False, 2.5, 4),
    ("sigmoid", 1, 1, "top2_sum", True, 2.5, 2),
]


@pytest.mark.parametrize("path", ["cpu_kernel", "pytorch"])
@pytest.mark.parametrize("score_func,n_groups,topk_groups,group_score,norm,scale,top_k", NOAUX_CASES)
def test_noaux_tc_selection_and_weights_match_float64_reference(
    monkeypatch, path, score_func, n_groups, topk_groups, group_score, norm, scale, top_k
):
    if path == "pytorch":
        monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    cfg = NoauxTCConfig(
        top_k=top_k,
        score_func=score_func,
        n_groups=n_groups,
        topk_groups=topk_groups,
        group_score=group_score,
        norm_topk_prob=norm,
        route_scale=scale,
    )
    router = make_router(NoauxTCRouter, cfg, n_experts=8).eval()
    torch.manual_seed(1)
    router.e_score_correction_bias.copy_(torch.randn(8) * 0.2)  # large enough to change some choices
    x = torch.randn(24, 8, dtype=torch.float64)

    weights, idx, stats = router(x)

    expected = reference_route(
        x,
        router.weight.detach(),
        router.e_score_correction_bias,
        top_k=top_k,
        score_func=score_func,
        n_groups=n_groups,
        topk_groups=topk_groups,
        group_score=group_score,
        norm=norm,
        scale=scale,
    )
    got = as_dicts(weights, idx)
    for g, e in zip(got, expected, strict=True):
        assert sorted(g) == sorted(e)
        for k in e:
            assert g[k] == pytest.approx(e[k], rel=1e-12, abs=1e-15)
    assert stats["load"].tolist() == torch.bincount(idx.flatten(), minlength=8).tolist()


def test_group_limit_and_bias_actually_change_the_choice_in_reference_cases():
    # Guards the parity test above: with these seeds the group limit and the bias both matter.
    cfg = NoauxTCConfig(top_k=3, n_groups=4, topk_groups=2, norm_topk_prob=True, route_scale=2.5)
    router = make_router(NoauxTCRouter, cfg, n_experts=8).eval()
    torch.manual_seed(1)
    bias = torch.randn(8) * 0.2
    x = torch.randn(24, 8, dtype=torch.float64)
    kw = dict(top_k=3, score_func="sigmoid", group_score="top2_sum", norm=True, scale=2.5)
    limited = reference_route(x, router.weight.detach(), bias, n_groups=4, topk_groups=2, **kw)
    free = reference_route(x, router.weight.detach(), bias, n_groups=1, topk_groups=1, **kw)
    unbiased = reference_route(x, router.weight.detach(), torch.zeros(8), n_groups=4, topk_groups=2, **kw)
    assert any(sorted(a) != sorted(b) for a, b in zip(limited, free, strict=True))
    assert any(sorted(a) != sorted(b) for a, b in zip(limited, unbiased, strict=True))


@pytest.mark.parametrize("cls,cfg_cls", [(GreedyRouter, GreedyConfig), (AuxLossRouter, AuxLossConfig)])
@pytest.mark.parametrize("score_func,norm", [("softmax", False), ("softmax", True), ("sigmoid", True)])
def test_plain_topk_routers_match_reference(cls, cfg_cls, score_func, norm):
    cfg = cfg_cls(top_k=2, score_func=score_func, norm_topk_prob=norm, route_scale=1.5)
    router = make_router(cls, cfg, n_experts=6).eval()
    x = torch.randn(10, 8, dtype=torch.float64)
    weights, idx, _ = router(x)
    expected = reference_route(
        x,
        router.weight.detach(),
        torch.zeros(6),
        top_k=2,
        score_func=score_func,
        n_groups=1,
        topk_groups=1,
        group_score="max",
        norm=norm,
        scale=1.5,
    )
    for g, e in zip(as_dicts(weights, idx), expected, strict=True):
        assert sorted(g) == sorted(e)
        assert [g[k] for k in sorted(e)] == pytest.approx([e[k] for k in sorted(e)], rel=1e-12)


def test_bias_changes_selection_but_weights_use_unbiased_scores():
    cfg = NoauxTCConfig(top_k=2, norm_topk_prob=False, route_scale=1.0)
    router = make_router(NoauxTCRouter, cfg, n_experts=4).eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    router.e_score_correction_bias.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))  # forces experts {0, 1}
    weights, idx, _ = router(x)
    assert idx.sort(dim=-1).values.tolist() == [[0, 1]] * 5
    scores = torch.sigmoid(x @ router.weight.detach().T)
    assert torch.allclose(weights, scores.gather(1, idx))


def test_eval_forward_does_not_accumulate_tokens_per_expert():
    router = make_router(NoauxTCRouter, NoauxTCConfig(top_k=2), n_experts=4)
    x = torch.randn(6, 8, dtype=torch.float64)
    router.eval()
    router(x)
    assert router.step_load.sum().item() == 0
    assert router.load_metrics() == {}
    router.train()
    router(x)
    router(x)
    assert router.step_load.sum().item() == 2 * 6 * 2
    assert router.step_load.dtype == torch.float32


def test_load_metrics_report_maxvio_of_the_step():
    router = make_router(NoauxTCRouter, NoauxTCConfig(top_k=1), n_experts=4)
    router.step_load.copy_(torch.tensor([6.0, 2.0, 0.0, 0.0]))
    metrics = router.load_metrics()
    assert metrics["maxvio"] == pytest.approx(6.0 / 2.0 - 1.0)
    assert metrics["expert_load"] == [6.0, 2.0, 0.0, 0.0]


def test_sign_rule_moves_bias_against_load_and_resets_counts():
    router = make_router(NoauxTCRouter, NoauxTCConfig(top_k=1, bias_update_speed=0.01), n_experts=4)
    router.step_load.copy_(torch.tensor([5.0, 3.0, 4.0, 4.0]))  # mean 4: over, under, at, at
    router.end_step()
    assert router.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    assert router.step_load.tolist() == [0.0] * 4


def test_bias_update_balances_skewed_load_and_leaves_gradients_untouched():
    n_experts, dim = 8, 16
    cfg = NoauxTCConfig(top_k=2, bias_update_speed=0.01, seq_aux_alpha=0.0)
    router = make_router(NoauxTCRouter, cfg, n_experts, dim=dim, dtype=torch.float32).train()
    gen = torch.Generator().manual_seed(3)
    skew = torch.randn(dim, generator=gen) * 2.0  # a shared direction every token carries: a few experts win

    sentinel = {n: torch.full_like(p, 7.0) for n, p in router.named_parameters()}
    for n, p in router.named_parameters():
        p.grad = sentinel[n].clone()
    weight_before = router.weight.detach().clone()

    maxvio = []
    for _ in range(150):
        router(torch.randn(256, dim, generator=gen) + skew)
        maxvio.append(router.load_metrics()["maxvio"])
        router.end_step()

    first, last = sum(maxvio[:5]) / 5, sum(maxvio[-20:]) / 20
    assert first > 1.0, "the synthetic input should start badly skewed"
    assert last < 0.25 * first
    for n, p in router.named_parameters():
        assert torch.equal(p.grad, sentinel[n]), f"{n}.grad changed"
    assert torch.equal(router.weight.detach(), weight_before)
    assert "e_score_correction_bias" not in dict(router.named_parameters())
    assert all(p is not router.e_score_correction_bias for p in router.parameters())
    assert "e_score_correction_bias" in router.state_dict()
    assert "step_load" not in router.state_dict()


def test_bias_update_with_no_grad_parameters_keeps_grad_none():
    router = make_router(NoauxTCRouter, NoauxTCConfig(top_k=1), n_experts=4).train()
    router(torch.randn(8, 8, dtype=torch.float64))
    router.end_step()
    assert all(p.grad is None for p in router.parameters())


def test_fp32_buffers_survive_casting_the_model_to_bf16():
    router = make_router(NoauxTCRouter, NoauxTCConfig(top_k=1), n_experts=4).to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.step_load.dtype == torch.float32
    router.train()(torch.randn(4, 8, dtype=torch.bfloat16))
    router.end_step()
    assert router.e_score_correction_bias.abs().max().item() == pytest.approx(1e-3)


def test_sequence_wise_balance_loss_matches_hand_computation():
    E, K, B, T = 4, 2, 2, 3
    alpha = 0.1
    cfg = NoauxTCConfig(top_k=K, seq_aux_alpha=alpha)
    router = make_router(NoauxTCRouter, cfg, n_experts=E).train()
    x = torch.randn(B * T, 8, dtype=torch.float64)
    _, idx, _ = router(x, seq_shape=(B, T))
    loss = router.balance_loss()

    s = torch.sigmoid(x @ router.weight.detach().T)
    total = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        for i in range(E):
            hits = sum(1 for t in rows if i in idx[t].tolist())
            f_i = E / (K * T) * hits
            P_i = sum(float(s[t, i] / s[t].sum()) for t in rows) / T
            total += f_i * P_i
    assert loss.item() == pytest.approx(alpha * total / B, rel=1e-12)

    loss.backward()  # gradient flows through P into the gate weight
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_sequence_wise_loss_treats_flat_tokens_as_one_sequence_without_shape():
    cfg = NoauxTCConfig(top_k=2, seq_aux_alpha=1.0)
    router = make_router(NoauxTCRouter, cfg, n_experts=4).train()
    x = torch.randn(6, 8, dtype=torch.float64)
    router(x)
    one = router.balance_loss()
    router(x, seq_shape=(1, 6))
    assert torch.equal(one, router.balance_loss())


def test_aux_loss_router_loss_matches_hand_computation():
    E, K, N = 5, 2, 7
    alpha = 0.01
    router = make_router(AuxLossRouter, AuxLossConfig(top_k=K, aux_alpha=alpha), n_experts=E).train()
    x = torch.randn(N, 8, dtype=torch.float64)
    _, idx, _ = router(x, seq_shape=(1, N))
    p = torch.softmax(x @ router.weight.detach().T, dim=-1)
    total = 0.0
    for i in range(E):
        f_i = sum(1 for t in range(N) if i in idx[t].tolist()) / (N * K)
        P_i = float(p[:, i].mean())
        total += f_i * P_i
    assert router.balance_loss().item() == pytest.approx(alpha * E * total, rel=1e-12)


def test_losses_are_none_in_eval_and_when_disabled():
    x = torch.randn(6, 8, dtype=torch.float64)
    off = make_router(NoauxTCRouter, NoauxTCConfig(top_k=2, seq_aux_alpha=0.0), n_experts=4).train()
    off(x)
    assert off.balance_loss() is None
    on = make_router(AuxLossRouter, AuxLossConfig(top_k=2), n_experts=4).eval()
    on(x)
    assert on.balance_loss() is None
    greedy = make_router(GreedyRouter, GreedyConfig(top_k=2), n_experts=4).train()
    greedy(x)
    assert greedy.balance_loss() is None


def test_router_rejects_top_k_above_expert_count_naming_the_key():
    with pytest.raises(ValueError, match=r"router\.top_k = 5: must be <= n_routed_experts = 4"):
        make_router(GreedyRouter, GreedyConfig(top_k=5), n_experts=4)
    with pytest.raises(ValueError, match=r"router\.n_groups = 3: must divide n_routed_experts = 8"):
        make_router(NoauxTCRouter, NoauxTCConfig(top_k=2, n_groups=3), n_experts=8)


@pytest.mark.skipif(__import__("os").environ.get("DSK_CPU_KERNELS") == "0", reason="CPU kernels disabled")
@pytest.mark.parametrize("n_groups,topk_groups,group_score", [(8, 4, "top2_sum"), (8, 3, "max"), (1, 1, "top2_sum")])
def test_routing_kernel_selects_as_the_pytorch_path_and_sorts_slots_stably(
    monkeypatch, n_groups, topk_groups, group_score
):
    from dsk_moe import kernels

    assert kernels.EXTENSION.load() is not None, kernels.EXTENSION.status()
    cfg = NoauxTCConfig(top_k=6, n_groups=n_groups, topk_groups=topk_groups, group_score=group_score)
    router = make_router(NoauxTCRouter, cfg, n_experts=64, dim=16, dtype=torch.float32).eval()
    router.e_score_correction_bias.copy_(torch.randn(64, generator=torch.Generator().manual_seed(2)) * 0.05)
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(3))
    w_kernel, idx_kernel, stats = router(x)
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    w_torch, idx_torch, stats_torch = router(x)
    assert "order" in stats and "order" not in stats_torch
    # same experts and weights per token; the kernel lists them best first
    by_expert = [dict(zip(i.tolist(), w.tolist(), strict=True)) for w, i in zip(w_kernel, idx_kernel, strict=True)]
    by_expert_torch = [dict(zip(i.tolist(), w.tolist(), strict=True)) for w, i in zip(w_torch, idx_torch, strict=True)]
    for a, b in zip(by_expert, by_expert_torch, strict=True):
        assert sorted(a) == sorted(b)
        assert [a[e] for e in sorted(a)] == pytest.approx([b[e] for e in sorted(b)], rel=1e-6)
    biased = router.scores(x).detach() + router.e_score_correction_bias
    assert (biased.gather(1, idx_kernel).diff(dim=1) <= 0).all()
    assert torch.equal(stats["order"], torch.argsort(idx_kernel.flatten(), stable=True))
    assert torch.equal(stats["load"], stats_torch["load"])


@pytest.mark.skipif(__import__("os").environ.get("DSK_CPU_KERNELS") == "0", reason="CPU kernels disabled")
@pytest.mark.parametrize("norm,alpha,seq_shape", [(True, 1e-2, (3, 8)), (False, 1e-2, None), (True, 0.0, (3, 8))])
def test_routing_weights_kernel_matches_the_pytorch_path_with_gradients(monkeypatch, norm, alpha, seq_shape):
    from dsk_moe import kernels

    assert kernels.EXTENSION.load() is not None, kernels.EXTENSION.status()
    cfg = NoauxTCConfig(top_k=3, n_groups=4, topk_groups=2, norm_topk_prob=norm, route_scale=2.5, seq_aux_alpha=alpha)
    router = make_router(NoauxTCRouter, cfg, n_experts=16).train()
    x = torch.randn(24, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    upstream = torch.randn(24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def run():
        router.zero_grad(set_to_none=True)
        weights, idx, _ = router(x, seq_shape=seq_shape)
        # a loss that does not depend on the order the K experts are listed in
        loss = (torch.zeros_like(upstream).scatter(1, idx, weights) * upstream).sum()
        balance = router.balance_loss()
        if balance is not None:
            loss = loss + 100 * balance
        loss.backward()
        router.end_step()
        return weights.detach(), idx, balance, router.weight.grad.clone()

    fused = run()
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    plain = run()
    order = fused[1].argsort(dim=1), plain[1].argsort(dim=1)  # the kernel lists experts best first
    assert torch.equal(fused[1].gather(1, order[0]), plain[1].gather(1, order[1]))
    torch.testing.assert_close(fused[0].gather(1, order[0]), plain[0].gather(1, order[1]), rtol=1e-12, atol=1e-14)
    assert (fused[2] is None) == (plain[2] is None) == (alpha == 0)
    if alpha:
        torch.testing.assert_close(fused[2], plain[2], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fused[3], plain[3], rtol=1e-10, atol=1e-13)


@pytest.mark.skipif(__import__("os").environ.get("DSK_CPU_KERNELS") == "0", reason="CPU kernels disabled")
def test_routing_weights_kernel_gradcheck():
    from dsk_moe import kernels

    assert kernels.EXTENSION.load() is not None, kernels.EXTENSION.status()
    g = torch.Generator().manual_seed(7)
    scores = torch.rand(6, 5, dtype=torch.float64, generator=g).add_(0.1).requires_grad_(True)
    idx = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(6)])
    for norm in (True, False):
        torch.autograd.gradcheck(lambda s, norm=norm: kernels.route_weights(s, idx, norm, 1.5, 0.3, (2, 3)), (scores,))


@pytest.mark.skipif(__import__("os").environ.get("DSK_CPU_KERNELS") == "0", reason="CPU kernels disabled")
def test_routing_kernel_keeps_expert_ids_valid_on_nan_scores():
    from dsk_moe import kernels

    assert kernels.EXTENSION.load() is not None, kernels.EXTENSION.status()
    scores = torch.rand(5, 16)
    scores[1] = float("nan")  # a diverged token
    scores[3, :8] = float("nan")
    idx, order, load = kernels.route_topk(scores, None, 4, 2, 3)
    assert idx.min() >= 0 and idx.max() < 16
    assert all(len(set(row)) == 3 for row in idx.tolist())
    assert torch.equal(order, torch.argsort(idx.flatten(), stable=True)) and load.sum() == 15
