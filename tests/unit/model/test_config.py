"""ModelConfig: slot defaults, validation and the torch-free import."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from dsk.model.config import ModelConfig
from dsk.testing import builtin_registry


def test_defaults_are_mla_attention_moe_ffn_dense_first_layers_and_no_mtp():
    cfg = builtin_registry().validate(ModelConfig, {})
    assert (cfg.attention.kind, cfg.attention.name) == ("attention", "mla")
    assert (cfg.ffn.kind, cfg.ffn.name) == ("ffn", "moe")
    assert (cfg.dense_ffn.kind, cfg.dense_ffn.name) == ("ffn", "dense")
    assert cfg.mtp is None
    assert cfg.vocab_size is None


def test_mtp_table_resolves_to_the_mtp_component():
    cfg = builtin_registry().validate(ModelConfig, {"mtp": {"type": "mtp", "depth": 2, "loss_weight": 0.1}})
    assert cfg.mtp.name == "mtp"
    assert (cfg.mtp.config.depth, cfg.mtp.config.loss_weight) == (2, 0.1)


def test_first_k_dense_above_n_layers_is_rejected_with_both_values():
    with pytest.raises(ValidationError, match="first_k_dense = 5 is more than n_layers = 2"):
        builtin_registry().validate(ModelConfig, {"n_layers": 2, "first_k_dense": 5})


def test_unknown_key_is_rejected():
    with pytest.raises(ValidationError):
        builtin_registry().validate(ModelConfig, {"dimm": 8})


def test_a_slot_table_without_a_registry_names_the_missing_context():
    # one registry, passed explicitly: nothing falls back to a process-global one
    with pytest.raises(ValidationError, match="needs the registry"):
        ModelConfig.model_validate({"attention": {"type": "mla"}})


def test_importing_the_config_does_not_import_torch():
    code = "import sys, dsk.model.config, dsk.model; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
