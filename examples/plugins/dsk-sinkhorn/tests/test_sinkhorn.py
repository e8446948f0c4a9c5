"""router/sinkhorn against dsk's router contract suite, its Sinkhorn scaling against a float64 reference, and its
balance on skewed inputs against plain top-k on the same scores."""

import pytest
import torch
from dsk_sinkhorn import plugin
from dsk_sinkhorn.config import SinkhornConfig
from dsk_sinkhorn.router import SinkhornRouter, sinkhorn_log

from dsk.api import ModelContext
from dsk.testing.contracts.model import check_config_round_trip, check_registration, check_router

CTX = ModelContext(dim=8, n_layers=1, vocab_size=16, max_seq_len=16, init_std=0.5)


def reference_plan(logits, n_iters, tau):
    """Sinkhorn-Knopp written plainly in float64 (no log domain): P = exp(s / tau), then rows to 1, columns to N/E."""
    n_tokens, n_experts = logits.shape
    P = torch.exp(logits.double() / tau)
    for _ in range(n_iters):
        P = P / P.sum(dim=1, keepdim=True)
        P = P * (n_tokens / n_experts) / P.sum(dim=0, keepdim=True)
    return P


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("balanced_eval", [False, True])
def test_meets_the_router_contract(score_func, balanced_eval):
    config = SinkhornConfig(top_k=2, score_func=score_func, balanced_eval=balanced_eval)
    check_router(lambda: SinkhornRouter(config, CTX, 6).double(), n_experts=6, dim=8, top_k=2)


def test_meets_the_router_contract_in_float32():
    check_router(lambda: SinkhornRouter(SinkhornConfig(top_k=3), CTX, 8), n_experts=8, dim=8, top_k=3, n_tokens=20)


def test_config_round_trip():
    table = {"top_k": 3, "n_iters": 4, "tau": 0.5, "score_func": "sigmoid", "normalize": False, "route_scale": 2.5,
             "balanced_eval": True}  # fmt: skip
    check_config_round_trip(SinkhornConfig, table)
    check_config_round_trip(SinkhornConfig, {})


def test_registered_as_router():
    check_registration(plugin, "router", "sinkhorn")


def test_scaling_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(24, 6, generator=gen, dtype=torch.float64)
    got = sinkhorn_log(logits, n_iters=5, tau=0.7).exp()
    assert torch.allclose(got, reference_plan(logits, 5, 0.7), rtol=1e-10, atol=1e-12)
    # in float32, the log domain keeps it close to the float64 result
    got32 = sinkhorn_log(logits.float(), n_iters=5, tau=0.7).exp()
    assert torch.allclose(got32.double(), reference_plan(logits, 5, 0.7), rtol=1e-4, atol=1e-5)


def test_enough_iterations_balance_rows_and_columns():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 8, generator=gen) + torch.tensor([4.0, 0, 0, 0, 0, 0, 0, -2.0])  # a favoured expert
    P = sinkhorn_log(logits, n_iters=200, tau=1.0).exp().double()
    assert torch.allclose(P.sum(dim=1), torch.ones(32, dtype=torch.float64), atol=1e-4)  # each token routes 1
    assert torch.allclose(P.sum(dim=0), torch.full((8,), 32 / 8, dtype=torch.float64), atol=1e-4)  # N/E each
    # and the plain exp(s) it started from was far from balanced
    raw = reference_plan(logits, 0, 1.0)
    raw = raw / raw.sum(dim=1, keepdim=True)
    assert float(raw.sum(dim=0).max()) > 2 * 32 / 8


def test_large_logits_stay_finite_in_float32():
    logits = torch.tensor([[200.0, 0.0, -200.0], [150.0, 10.0, 0.0], [0.0, 0.0, 300.0]])
    P = sinkhorn_log(logits, n_iters=20, tau=0.1).exp()
    assert torch.isfinite(P).all()
    assert torch.allclose(P.sum(dim=0), torch.ones(3), atol=1e-5)


def maxvio(idx, n_experts):
    load = torch.bincount(idx.flatten(), minlength=n_experts).double()
    return float(load.max() / load.mean() - 1)


@pytest.mark.parametrize("top_k", [1, 2])
def test_balances_skewed_inputs_far_better_than_plain_top_k(top_k):
    torch.manual_seed(0)
    n_experts, n_tokens = 8, 256
    router = SinkhornRouter(SinkhornConfig(top_k=top_k, n_iters=20), CTX, n_experts).double().train()
    x = torch.randn(n_tokens, 8, dtype=torch.float64)
    # a bias in the inputs along expert 0's gate row makes expert 0 everyone's favourite
    favoured = router.weight.detach()[0]
    x = x + 3.0 * favoured / favoured.norm() ** 2
    scores = router.logits(x).softmax(dim=-1)
    assert int(scores.argmax(dim=-1).eq(0).sum()) > n_tokens // 2  # skewed indeed

    _, idx, stats = router(x)
    plain = scores.topk(top_k, dim=-1).indices  # a plain top-k router on the same scores
    assert maxvio(plain, n_experts) > 1.0
    assert maxvio(idx, n_experts) < 0.25 * maxvio(plain, n_experts)
    assert router.load_metrics()["maxvio"] == pytest.approx(maxvio(idx, n_experts))
    assert torch.equal(stats["load"], torch.bincount(idx.flatten(), minlength=n_experts))

    # eval selects on the raw scores (balanced_eval = false): the plain top-k, and nothing counted
    router.eval()
    before = router.step_load.clone()
    with torch.no_grad():
        _, idx_eval, _ = router(x)
    assert torch.equal(idx_eval.sort(dim=-1).values, plain.sort(dim=-1).values)
    assert torch.equal(router.step_load, before)


def test_gate_weights_are_the_raw_scores_of_the_chosen_experts():
    torch.manual_seed(0)
    config = SinkhornConfig(top_k=2, score_func="sigmoid", normalize=False, route_scale=2.5)
    router = SinkhornRouter(config, CTX, 6).double().train()
    x = torch.randn(10, 8, dtype=torch.float64)
    weights, idx, _ = router(x)
    expected = 2.5 * router.logits(x).sigmoid().gather(1, idx)
    assert torch.allclose(weights, expected, rtol=0, atol=1e-12)
    normalized = SinkhornRouter(SinkhornConfig(top_k=2), CTX, 6).double().train()
    w, _, _ = normalized(x)
    assert torch.allclose(w.sum(dim=-1), torch.ones(10, dtype=torch.float64), atol=1e-12)
