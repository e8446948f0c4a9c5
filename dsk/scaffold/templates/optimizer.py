"""Template of an ``optimizer`` plugin: SGD with momentum through torch.optim, its param groups named."""

SUMMARY = "SGD with momentum (torch.optim.SGD), weight decay on matrices only"
MODULE = "optimizer"
TABLE = "[optimizer]"
IMPL_NAME = "build_optimizer"
CONTRACT = "`dsk.testing.contracts.data.check_optimizer`"

CONFIG = '''\
"""Options of the $comp optimizer: the [optimizer] table. Torch-free; every field defaulted.

The learning-rate schedule and clipping (lr, min_lr, warmup_steps, schedule, grad_clip) come from
dsk.api.OptimizerConfig, which every optimizer config subclasses: the trainer sets the rate of each step.
"""

from dsk.api import OptimizerConfig
from pydantic import Field


class $Config(OptimizerConfig):
    """SGD with (optionally Nesterov) momentum; decay on matrices, none on norm gains and biases."""

    lr: float = Field(0.05, gt=0, description="peak learning rate")
    min_lr: float = Field(0.005, ge=0, description="learning rate at the end of the cosine decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum factor (0: plain SGD)")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0)")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay of matrices (1-D tensors get none)")
'''

IMPL = '''\
"""The $comp optimizer: torch.optim.SGD with momentum over two named parameter groups.

Contract (docs/plugins.md, "optimizer"): `build_optimizer(config, model)` returns a torch.optim.Optimizer whose
param groups carry "names" (dsk saves the state by parameter name), together holding each trainable parameter
once. Its state must round-trip through `state_dict()` in its own dtypes. Swap torch.optim.SGD for your own
optimizer (keep the groups) to make it yours.
"""

import torch
from dsk.api.runtime import named_unique_parameters
from torch import nn

from .config import $Config


def build_optimizer(config: $Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD over the model's trainable parameters: matrices decay, vectors (norm gains, biases) do not."""
    decay, no_decay = [], []
    for name, p in named_unique_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": config.weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.SGD(
        [g for g in groups if g["params"]],
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
    )
'''

TEST = '''\
"""$comp against dsk's optimizer contract suite (named groups, state round trip, determinism)."""

import torch
from dsk.testing.contracts.data import check_optimizer
from dsk.testing.contracts.model import check_config_round_trip, check_registration
from torch import nn

from $pkg import plugin
from $pkg.config import $Config
from $pkg.optimizer import build_optimizer


class Tiny(nn.Module):
    """Matrices and a vector, as a transformer has."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8, bias=False)
        self.gain = nn.Parameter(torch.ones(8))


def test_meets_the_optimizer_contract():
    check_optimizer(lambda model: build_optimizer($Config(weight_decay=0.01), model), Tiny)


def test_vectors_get_no_weight_decay():
    opt = build_optimizer($Config(weight_decay=0.1), Tiny())
    decay = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert decay == {"embed.weight": 0.1, "proj.weight": 0.1, "gain": 0.0}


def test_config_round_trip():
    check_config_round_trip($Config, {"lr": 0.1, "momentum": 0.5, "nesterov": True})


def test_registered_as_optimizer():
    check_registration(plugin, "optimizer", "$comp")
'''

RECIPE = {
    "optimizer": 'type = "$comp"\nlr = 0.05\nmin_lr = 0.005\nwarmup_steps = 2\nmomentum = 0.9',
}
