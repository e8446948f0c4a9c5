"""dsk_moe configs and registration: defaults, cross-field validation naming the keys, torch-free imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
from dsk_moe.config import AuxLossConfig, DenseConfig, GreedyConfig, MoEConfig, NoauxTCConfig
from pydantic import ValidationError

from dsk.api import ResolvedSlot


def slot(cfg, name="noaux_tc"):
    return ResolvedSlot(kind="router", name=name, config=cfg, impl="dsk_moe.router:NoauxTCRouter")


def test_defaults_validate_and_match_v3_rules():
    r = NoauxTCConfig()
    assert (r.score_func, r.group_score, r.norm_topk_prob) == ("sigmoid", "top2_sum", True)
    assert (r.bias_update_speed, r.seq_aux_alpha) == (1e-3, 1e-4)
    assert AuxLossConfig().score_func == "softmax"
    assert MoEConfig(router=slot(r)).dispatch == "auto"
    assert DenseConfig().hidden_dim > 0


def test_every_field_has_a_description():
    for model in (DenseConfig, MoEConfig, NoauxTCConfig, AuxLossConfig, GreedyConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"


def test_unknown_key_is_rejected():
    with pytest.raises(ValidationError, match="topk"):
        NoauxTCConfig(topk=2)


def test_topk_groups_above_n_groups_names_both_keys():
    with pytest.raises(ValidationError, match=r"router\.topk_groups = 5: must be <= router\.n_groups = 4"):
        NoauxTCConfig(n_groups=4, topk_groups=5)


@pytest.mark.parametrize(
    "router,message",
    [
        (GreedyConfig(top_k=9), r"router\.top_k = 9: must be <= n_routed_experts = 8"),
        (NoauxTCConfig(top_k=2, n_groups=3, topk_groups=1), r"router\.n_groups = 3: must divide n_routed_experts = 8"),
        (
            NoauxTCConfig(top_k=5, n_groups=4, topk_groups=2),
            r"router\.top_k = 5: must be <= topk_groups \* experts "
            r"per group = 2 \* 2 = 4",
        ),
        (NoauxTCConfig(top_k=2, n_groups=8, topk_groups=4), r"group_score = 'top2_sum' needs >= 2 experts per group"),
    ],
)
def test_moe_validator_checks_router_against_expert_count(router, message):
    with pytest.raises(ValidationError, match=message):
        MoEConfig(n_routed_experts=8, router=slot(router))


def test_group_limit_that_fits_is_accepted():
    cfg = MoEConfig(n_routed_experts=8, router=slot(NoauxTCConfig(top_k=4, n_groups=4, topk_groups=2)))
    assert cfg.router.config.n_groups == 4
    cfg = MoEConfig(
        n_routed_experts=8, router=slot(NoauxTCConfig(top_k=2, n_groups=8, topk_groups=4, group_score="max"))
    )
    assert cfg.router.config.group_score == "max"


def test_config_and_plugin_modules_import_without_torch():
    code = "import sys, dsk_moe.plugin, dsk_moe.config; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_plugin_registers_ffn_and_router_components_lazily():
    from dsk_moe import __version__, plugin

    calls = []
    plugin.register_model_components(lambda kind, name, impl, **kw: calls.append((kind, name, impl, kw)))
    got = {(kind, name): (impl, kw["config"]) for kind, name, impl, kw in calls}
    assert got == {
        ("ffn", "moe"): ("dsk_moe.moe:MoE", MoEConfig),
        ("ffn", "dense"): ("dsk_moe.experts:Dense", DenseConfig),
        ("router", "noaux_tc"): ("dsk_moe.router:NoauxTCRouter", NoauxTCConfig),
        ("router", "aux_loss"): ("dsk_moe.router:AuxLossRouter", AuxLossConfig),
        ("router", "greedy"): ("dsk_moe.router:GreedyRouter", GreedyConfig),
    }
    assert all(isinstance(impl, str) for impl, _ in got.values())
    assert __version__ == "0.1.0"
