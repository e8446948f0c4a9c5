"""Template of an ``ffn`` plugin: a SwiGLU feed-forward layer."""

SUMMARY = "SwiGLU feed-forward layer"
MODULE = "ffn"
TABLE = "[model.ffn]"
IMPL_NAME = "{Class}"
CONTRACT = "`dsk.testing.contracts.model.check_ffn`"

CONFIG = '''\
"""Options of the $comp FFN: a [model.ffn] or [model.dense_ffn] table. Torch-free; every field defaulted."""

from dsk.api import BaseConfig
from pydantic import Field


class $Config(BaseConfig):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    hidden_dim: int = Field(128, ge=1, description="hidden width of the gate and up projections")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the hidden activation in training (0: none)")
'''

IMPL = '''\
"""The $comp FFN: SwiGLU, y = W_down(silu(W_gate x) * W_up x) (Shazeer 2020, the FFN of DeepSeek-V3's dense layers).

Contract (docs/plugins.md, "ffn"): built as `$Class(config, ctx)`; `forward(x [B, T, D]) -> y [B, T, D]` in x's
dtype. Optional side channels: `aux_loss()`, `step_stat_tensors()` / `step_metrics()`,
`after_optimizer_step()` (see dsk.api's AuxLossSource, StepStatistics, AfterOptimizerStep). Change `forward` (and
the projections in `__init__`) to make it yours.
"""

import torch
import torch.nn.functional as F
from dsk.api import ModelContext
from torch import nn

from .config import $Config


class $Class(nn.Module):
    """Gate, up and down projections without biases."""

    def __init__(self, config: $Config, ctx: ModelContext):
        super().__init__()
        self.cfg = config
        self.gate_proj = nn.Linear(ctx.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(ctx.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, ctx.dim, bias=False)
        for m in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(m.weight, std=ctx.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D]."""
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, H)
        h = F.dropout(h, self.cfg.dropout, self.training)
        return self.down_proj(h)
'''

TEST = '''\
"""$comp against dsk's ffn contract suite, and against the SwiGLU formula."""

import torch
from dsk.api import ModelContext
from dsk.testing.contracts.model import check_config_round_trip, check_ffn, check_registration

from $pkg import plugin
from $pkg.config import $Config
from $pkg.ffn import $Class

CTX = ModelContext(dim=8, n_layers=1, vocab_size=16, max_seq_len=16, init_std=0.5)


def test_meets_the_ffn_contract():
    check_ffn(lambda: $Class($Config(hidden_dim=12), CTX).double(), dim=8)


def test_computes_swiglu():
    torch.manual_seed(0)
    ffn = $Class($Config(hidden_dim=12), CTX).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    g, u, d = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    expected = (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(ffn(x), expected)


def test_config_round_trip():
    check_config_round_trip($Config, {"hidden_dim": 64, "dropout": 0.1})


def test_registered_as_ffn():
    check_registration(plugin, "ffn", "$comp")
'''

RECIPE = {
    "model.dense_ffn": 'type = "$comp"\nhidden_dim = 64',
    "model.ffn": 'type = "$comp"\nhidden_dim = 64',
    "model.ffn.router": None,
}
