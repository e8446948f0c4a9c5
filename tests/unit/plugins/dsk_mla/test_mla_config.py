"""Configs and plugin registration: validation messages, HF spellings, and no torch at import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from dsk_mla.config import MHAConfig, MLAConfig, YarnConfig
from pydantic import ValidationError


def test_defaults_are_deepseek_v3():
    cfg = MLAConfig()
    sizes = (cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim, cfg.v_head_dim)
    assert sizes == (128, 1536, 512, 192, 128)
    assert cfg.decode_cache == "latent" and cfg.rope_scaling is None


def test_every_field_has_a_description():
    for model in (MLAConfig, MHAConfig, YarnConfig):
        assert all(f.description for f in model.model_fields.values()), model.__name__


def test_odd_rope_dim_is_rejected_naming_the_field():
    with pytest.raises(ValidationError, match="qk_rope_head_dim = 5: must be even"):
        MLAConfig(qk_rope_head_dim=5)


def test_unknown_key_and_bad_cache_layout_are_rejected():
    with pytest.raises(ValidationError, match="kv_rank"):
        MLAConfig(kv_rank=4)
    with pytest.raises(ValidationError, match="decode_cache"):
        MLAConfig(decode_cache="paged")


def test_yarn_betas_must_be_ordered():
    with pytest.raises(ValidationError, match="beta_fast = 1.0 must be > rope_scaling.beta_slow = 2.0"):
        YarnConfig(beta_fast=1, beta_slow=2)


def test_hf_rope_scaling_table_is_accepted_with_type_or_rope_type():
    hf = {
        "type": "yarn",
        "rope_type": "yarn",
        "factor": 40,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
    }
    assert MLAConfig(rope_scaling=hf).rope_scaling == YarnConfig()
    assert YarnConfig(rope_type="yarn", factor=8).factor == 8
    with pytest.raises(ValidationError, match="Input should be 'yarn'"):
        YarnConfig(rope_type="linear")


def test_mha_head_dim_must_be_even():
    with pytest.raises(ValidationError, match="head_dim = 7: must be even"):
        MHAConfig(head_dim=7)


def test_config_and_plugin_modules_do_not_import_torch():
    code = "import sys, dsk_mla.config, dsk_mla.plugin; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugin_registers_mla_and_mha_attention():
    from dsk_mla import plugin

    calls = []
    plugin.register_model_components(lambda *a, **kw: calls.append((a, kw)))
    got = {(a[0], a[1]): (a[2], kw["config"]) for a, kw in calls}
    assert got == {
        ("attention", "mla"): ("dsk_mla.mla:MLA", MLAConfig),
        ("attention", "mha"): ("dsk_mla.mha:MHA", MHAConfig),
    }
    assert all(kw.get("summary") for _, kw in calls)
