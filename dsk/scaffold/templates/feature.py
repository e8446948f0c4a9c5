"""Template of a ``feature`` plugin: seeded, annealed gradient noise with its state in every checkpoint."""

SUMMARY = "annealed Gaussian gradient noise (Neelakantan et al. 2015), seeded, its state checkpointed"
MODULE = "feature"
TABLE = "[features.$comp]"
IMPL_NAME = "{Class}"
CONTRACT = "`dsk.testing.contracts.run.check_feature`"

CONFIG = '''\
"""Options of the $comp feature: the [features.$comp] table. Torch-free; every field defaulted."""

from dsk.api import BaseConfig
from pydantic import Field


class $Config(BaseConfig):
    """Noise N(0, sigma_t^2) added to every gradient, sigma_t^2 = eta / (1 + t)^gamma at optimizer step t."""

    eta: float = Field(0.01, ge=0, description="noise variance at the first step")
    gamma: float = Field(0.55, ge=0, description="annealing exponent of the variance (0: constant noise)")
    seed: int = Field(0, description="seed of the noise generator")
'''

IMPL = '''\
"""The $comp feature: annealed Gaussian gradient noise (Neelakantan et al., "Adding Gradient Noise Improves
Learning for Very Deep Networks", 2015).

Contract (docs/plugins.md, "feature"): a dsk.api.Feature built as `$Class(config)`, acting only in the stages it
lists in `stages` (dsk.api.FEATURE_STAGES). Here: `before_step` (the gradients are final: clipped, finite; add the
noise), `after_step` (a metric for the step's row) and `state` (`state_dict` / `load_state_dict`: the noise
generator and the step count go into every checkpoint, so a resumed run draws the noise the straight run draws).
Change `before_step` to make it yours; list every stage you implement.
"""

import torch
from dsk.api import Feature

from .config import $Config


class $Class(Feature):
    """Adds seeded noise of variance eta / (1 + t)^gamma to the gradients before each optimizer step."""

    stages = ("before_step", "after_step", "state")

    def __init__(self, config: $Config | None = None):
        super().__init__(config if config is not None else $Config())
        self.generator = torch.Generator().manual_seed(self.config.seed)  # CPU: the same draws on every device
        self.steps_done = 0

    def std(self, step: int) -> float:
        """sigma_t at optimizer step `step` (1-based)."""
        return (self.config.eta / (1 + step) ** self.config.gamma) ** 0.5

    def before_step(self, run, step: int) -> None:
        """Add the noise to each gradient (every rank draws the same noise: the generator is seeded alike)."""
        std = self.std(step)
        with torch.no_grad():
            for p in run.params:
                if p.grad is not None:
                    noise = torch.randn(p.grad.shape, generator=self.generator, dtype=torch.float32)
                    p.grad.add_(noise.to(p.grad.device, p.grad.dtype), alpha=std)
        self.steps_done = step

    def after_step(self, run, step: int) -> dict[str, float]:
        """The noise level of this step, for the metrics row."""
        return {"$comp/std": self.std(step)}

    def state_dict(self) -> dict:
        """The generator state (a uint8 tensor) and the last step: a resumed run continues the same draws."""
        return {"generator": self.generator.get_state(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())
        self.steps_done = int(state["steps_done"])
'''

TEST = '''\
"""$comp against dsk's feature contract suite (stages, a tiny run, determinism, resume), plus its noise."""

import torch
from dsk.testing.contracts.model import check_config_round_trip, check_registration
from dsk.testing.contracts.run import check_feature

from $pkg import plugin
from $pkg.config import $Config
from $pkg.feature import $Class


def test_meets_the_feature_contract():
    check_feature($Class, $Config, name="$comp", table={"eta": 0.001})


def test_noise_is_seeded_and_annealed():
    a, b = $Class($Config(seed=1)), $Class($Config(seed=1))
    assert a.std(1) > a.std(10)

    class Run:
        params = [torch.nn.Parameter(torch.zeros(4))]

    for feature in (a, b):
        Run.params[0].grad = torch.zeros(4)
        feature.before_step(Run, 1)
        feature.noise = Run.params[0].grad.clone()
    assert torch.equal(a.noise, b.noise) and a.noise.abs().sum() > 0


def test_state_round_trip_continues_the_draws():
    a = $Class($Config(seed=2))
    state = a.state_dict()
    first = torch.randn(3, generator=a.generator)
    b = $Class($Config(seed=5))
    b.load_state_dict(state)
    assert torch.equal(torch.randn(3, generator=b.generator), first)


def test_config_round_trip():
    check_config_round_trip($Config, {"eta": 0.1, "gamma": 0.0, "seed": 3})


def test_registered_as_feature():
    check_registration(plugin, "feature", "$comp")
'''

RECIPE = {
    "features.$comp": "eta = 0.001",
}
