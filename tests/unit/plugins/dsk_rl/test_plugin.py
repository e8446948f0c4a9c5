"""The rl plugin: lazy, torch-free registration of the three trainers, and config validation with clear errors."""

import importlib
import subprocess
import sys

import pytest
from dsk_rl import plugin
from dsk_rl.config import DistillConfig, GRPOConfig, RejectionSamplingConfig
from pydantic import ValidationError

from dsk.testing import builtin_registry


def registrations():
    calls = []

    def register(kind, name, impl, *, config=None, summary=None, aliases=()):
        calls.append((kind, name, impl, config, summary))

    plugin.register_trainers(register)
    return calls


def test_registers_grpo_rejection_sampling_and_distill_trainers():
    calls = registrations()
    assert {(k, n) for k, n, *_ in calls} == {("trainer", "grpo"), ("trainer", "rejection_sampling"),
                                               ("trainer", "distill")}  # fmt: skip
    for _kind, name, impl, _config, summary in calls:
        module, attr = impl.split(":")
        assert summary and getattr(importlib.import_module(module), attr).name == name


def test_plugin_and_configs_import_no_torch():
    code = "import sys, dsk_rl.plugin, dsk_rl.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_grpo_needs_a_reward(dsk_registry):
    with pytest.raises(ValidationError, match="at least one reward"):
        builtin_registry().validate(GRPOConfig, {})
    cfg = builtin_registry().validate(GRPOConfig, dict(rewards={"accuracy": {}}))
    assert (cfg.loss_type, cfg.scale_rewards, cfg.beta, cfg.epsilon, cfg.num_iterations) == ("dapo", "group", 0.0,
                                                                                             0.2, 1)  # fmt: skip


def test_unknown_loss_type_and_reward_are_reported_with_their_key(tmp_path, dsk_cli):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[model]\ndim = 16\n[data]\ntype = "modular"\n[trainer]\ntype = "grpo"\nloss_type = "ppo"\n'
        "[trainer.rewards.acuracy]\n"
    )
    result = dsk_cli(["recipe", "validate", str(recipe)])
    assert result.exit_code == 2
    assert "trainer.loss_type" in result.stderr and "trainer.rewards.acuracy" in result.stderr
    assert "did you mean 'accuracy'" in result.stderr


def test_rejection_and_distill_configs_check_their_combinations(dsk_registry):
    with pytest.raises(ValidationError, match="mix_task"):
        builtin_registry().validate(RejectionSamplingConfig, dict(rewards={"accuracy": {}}, mix_count=3))
    with pytest.raises(ValidationError, match="teacher"):
        builtin_registry().validate(DistillConfig, dict(rewards={"accuracy": {}}))
    cfg = builtin_registry().validate(DistillConfig, dict(rewards={"accuracy": {}}, teacher="ckpt", mode="logit"))
    assert cfg.student_init == "previous" and cfg.kd_temperature == 1.0
