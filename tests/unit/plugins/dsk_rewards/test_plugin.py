"""The rewards plugin registers every reward by lazy name, torch-free, with a weight in every config."""

import importlib
import subprocess
import sys

from dsk_rewards import plugin
from dsk_rewards.config import RewardConfig

from dsk.api import ResolvedSlot


def registrations():
    calls = []

    def register(kind, name, impl, *, config=None, summary=None, aliases=()):
        calls.append((kind, name, impl, config, summary, aliases))

    plugin.register_rewards(register)
    return calls


def test_registers_the_five_rewards_with_weighted_configs():
    calls = registrations()
    assert {name for _, name, *_ in calls} == {"accuracy", "format", "language_consistency", "overlong", "steps"}
    for kind, _name, impl, config, summary, _aliases in calls:
        module, attr = impl.split(":")
        assert kind == "reward" and summary and callable(getattr(importlib.import_module(module), attr))
        assert issubclass(config, RewardConfig) and config().weight == 1.0


def test_plugin_and_rewards_import_no_torch():
    code = "import sys, dsk_rewards.plugin, dsk_rewards.rewards; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reward_tables_resolve_with_type_from_the_key(dsk_registry):
    from dsk_rl.config import GRPOConfig

    rewards = {"accuracy": {}, "language": {"weight": 0.5}, "fmt": {"type": "format", "weight": 2}}
    cfg = dsk_registry.validate(GRPOConfig, {"rewards": rewards})
    assert {k: (s.name, s.config.weight) for k, s in cfg.rewards.items()} == {
        "accuracy": ("accuracy", 1.0),
        "language": ("language_consistency", 0.5),
        "fmt": ("format", 2.0),
    }
    assert all(isinstance(s, ResolvedSlot) for s in cfg.rewards.values())
    out = cfg.rewards["fmt"].build(["p"], ["<think>a</think><answer>b</answer>"])
    assert out == [1.0]
