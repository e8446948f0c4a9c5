"""The linear-layer seam and the forward regions (dsk/model/linear.py, dsk/model/regions.py) on the real components."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dsk.api import LinearLayers
from dsk.api.runtime import LinearImpl, current_regions, recompute_scope, recomputing, region
from tests.unit.model.tiny import TINY, tiny_model


class Recording(LinearImpl):
    """Plain products, recording each call's site, shapes and the regions it ran in; grouped sites too."""

    def __init__(self, module_name: str, log: list):
        self.module_name, self.log = module_name, log

    def linear(self, x, weight, site):
        self.log.append((self.module_name, site, tuple(weight.shape), current_regions()))
        return F.linear(x, weight)

    def grouped(self, x_RK, weight_ENK, load_E, site):
        self.log.append((self.module_name, site, tuple(weight_ENK.shape), current_regions()))
        outs = [F.linear(x, w) for x, w in zip(x_RK.split(load_E.tolist()), weight_ENK.unbind(0), strict=True)]
        return torch.cat(outs)


def _install(model, log):
    users = {name: m for name, m in model.named_modules() if isinstance(m, LinearLayers)}
    for name, m in users.items():
        m.linear_impl = Recording(name, log)
    return users


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_every_listed_site_runs_through_the_impl_and_nothing_else(attention):
    overrides = {}
    if attention == "mha":
        overrides["attention"] = {"type": "mha", "n_heads": 2}
    ref = tiny_model(**overrides).train()
    model = copy.deepcopy(ref)
    log: list = []
    users = _install(model, log)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    want = ref(ids, with_mtp=True)
    got = model(ids, with_mtp=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-12)
    for a, b in zip(got.mtp_logits, want.mtp_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    called = {(mod, site) for mod, site, _, _ in log}
    listed = {(name, s.name) for name, m in users.items() for s in m.linear_sites()}
    assert called == listed
    # the weight shapes the impl saw are the shapes the sites declare ([N, K], or [E, N, K] for experts)
    declared = {
        (name, s.name): ((s.n_groups,) if s.grouped else ()) + (s.out_features, s.in_features)
        for name, m in users.items()
        for s in m.linear_sites()
    }
    assert {(mod, site): shape for mod, site, shape, _ in log} == declared
    # attention, dense ffn, shared and routed experts of the main layers and of the MTP blocks are users;
    # the router gate, the head, the embedding and the MTP projection are not
    kinds = {name.rsplit(".", 1)[-1] for name in users}
    assert {"self_attn", "mlp", "shared_experts", "experts"} <= kinds
    assert any(name.startswith("mtp.") for name in users)
    assert not any(name.endswith(("gate", "lm_head", "embed_tokens", "eh_proj")) for name in users)


def test_up_projections_run_in_their_region():
    model = tiny_model().train()
    log: list = []
    _install(model, log)
    model(torch.randint(0, TINY["vocab_size"], (1, 8)))
    regions = {site: r for _, site, _, r in log}
    assert regions["q_b_proj"] == ("attention.up_projection",)
    assert regions["kv_b_proj"] == ("attention.up_projection",)
    assert regions["q_kv_a"] == () and regions["o_proj"] == ()


def test_regions_nest_and_recompute_scope_is_visible():
    assert current_regions() == () and not recomputing()
    with region("a"), region("b"):
        assert current_regions() == ("a", "b")
        with recompute_scope():
            assert recomputing()
            with recompute_scope():
                assert recomputing()
            assert recomputing()
        assert not recomputing()
    assert current_regions() == ()


def test_a_forward_under_recompute_scope_counts_no_router_load():
    model = tiny_model().train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    model(ids, with_mtp=True)
    routers = [m.gate for m in model.modules() if hasattr(m, "gate") and hasattr(m.gate, "step_load")]
    counted = [r.step_load.clone() for r in routers]
    losses = [r.balance_loss() for r in routers]
    with recompute_scope():
        model(ids, with_mtp=True)
    for r, c, loss in zip(routers, counted, losses, strict=True):
        assert torch.equal(r.step_load, c) and r.step_load.sum() > 0
        assert r.balance_loss() is loss  # the first forward's loss is the one the training loss added
