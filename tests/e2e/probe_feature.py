"""A test plugin with a feature that acts in every stage of the feature contract (loaded with ``--plugin``).

``probe`` keeps an exponential moving average of the output head's weight (a real, stateful step feature), counts
the updates it saw, scales the embedding at transform time (an effect the losses show) and wraps the optimizer.
``cycle_a`` / ``cycle_b`` declare each other ``after``: a recipe with both has no valid order.
"""

from __future__ import annotations

from pydantic import Field

from dsk import hookimpl
from dsk.api import BaseConfig, Feature


class ProbeConfig(BaseConfig):
    """Options of the probe feature."""

    decay: float = Field(0.5, gt=0, lt=1, description="EMA decay of the head weight")
    embed_scale: float = Field(1.0, gt=0, description="factor applied to the embedding at transform time")


class Probe(Feature):
    """Acts in every stage; its state is the EMA tensor and the update count."""

    stages = ("transform_model", "after_weights", "wrap_optimizer", "before_step", "after_step", "state")

    def __init__(self, config: ProbeConfig):
        super().__init__(config)
        self.count = 0
        self.before = 0
        self.ema = None
        self.head = None
        self.seen = []

    def transform_model(self, model, run):
        import torch

        self.seen.append("transform_model")
        with torch.no_grad():
            model.embed_tokens.weight.mul_(self.config.embed_scale)
        return None

    def after_weights(self, model, run):
        self.seen.append("after_weights")
        self.head = model.lm_head.weight
        self.ema = self.head.detach().clone()
        return model

    def wrap_optimizer(self, optimizer, model, run):
        self.seen.append("wrap_optimizer")
        optimizer.probe_wrapped = True
        return optimizer

    def before_step(self, run, step):
        self.before += 1

    def after_step(self, run, step):
        import torch

        self.count += 1
        with torch.no_grad():
            self.ema.mul_(self.config.decay).add_(self.head.detach(), alpha=1 - self.config.decay)
        return {"probe/count": self.count, "probe/before": self.before, "probe/ema_norm": float(self.ema.norm())}

    def state_dict(self):
        return {"count": self.count, "before": self.before, "ema": self.ema}

    def load_state_dict(self, state):
        self.count = int(state["count"])
        self.before = int(state["before"])
        self.ema.copy_(state["ema"])


class CycleA(Feature):
    """Half of an impossible order."""

    stages = ()


class CycleB(Feature):
    """The other half."""

    stages = ()


@hookimpl
def register_features(register):
    register("feature", "probe", Probe, config=ProbeConfig, summary="test feature acting in every stage")
    register("feature", "cycle_a", CycleA, after=("cycle_b",))
    register("feature", "cycle_b", CycleB, after=("cycle_a",))
    register("feature", "loner", CycleA, conflicts=("probe",))
