"""Template of a ``router`` plugin: sigmoid or softmax top-k with per-step load statistics and bias balancing."""

SUMMARY = "top-k MoE router (sigmoid or softmax affinities) balanced by a per-expert selection bias"
MODULE = "router"
TABLE = "[model.ffn.router]"
IMPL_NAME = "{Class}"
CONTRACT = "`dsk.testing.contracts.model.check_router`"

CONFIG = '''\
"""Options of the $comp router: the [model.ffn.router] table of a recipe. Torch-free (recipes validate without
torch); every field has a default and a description (`dsk components show router/$comp` prints them)."""

from typing import Literal

from dsk.api import BaseConfig
from pydantic import Field


class $Config(BaseConfig):
    """Top-k routing over sigmoid or softmax affinities, balanced by a bias on the selection scores."""

    # the MoE layer reads top_k (its slots per token) and checks top_k <= its routed experts
    top_k: int = Field(2, ge=1, description="routed experts per token")
    score_func: Literal["sigmoid", "softmax"] = Field("sigmoid", description="affinity function of the router logits")
    normalize: bool = Field(True, description="renormalise the top_k weights of each token to sum to 1")
    bias_update_speed: float = Field(
        1e-3,
        ge=0,
        description="after each optimizer step, raise the bias of under-loaded experts by this (0 freezes it)",
    )
'''

IMPL = '''\
"""The $comp router: top-k over sigmoid or softmax affinities, balanced by a selection bias.

Contract (docs/plugins.md, "router"): built as `$Class(config, ctx, n_experts)`; `forward(x [N, D])` returns
(weights [N, K] in x's dtype, experts [N, K] int64, stats {"load": counts [E]}). The MoE layer calls it with
`seq_shape=(B, T)` too and reaches the side channels under the router's names: `balance_loss()`,
`load_tensors()` (summed over data-parallel ranks), `load_metrics()` and `end_step()` (once per optimizer step,
never touching gradients).

Change `scores` (the affinities), `select` (which experts) or `end_step` (the balancing rule) to make it yours.
Shape suffixes: N tokens, D model dim, E experts, K top_k.
"""

import torch
import torch.nn.functional as F
from dsk.api import ModelContext
from torch import nn

from .config import $Config


class $Class(nn.Module):
    """Linear gate, affinities, top-k on affinities + bias, weights from the unbiased affinities."""

    def __init__(self, config: $Config, ctx: ModelContext, n_experts: int):
        super().__init__()
        if config.top_k > n_experts:
            raise ValueError(f"router.top_k = {config.top_k}: must be <= the {n_experts} routed experts")
        self.cfg = config
        self.n_experts = n_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(n_experts, ctx.dim))
        nn.init.normal_(self.weight, std=ctx.init_std)
        # balancing state: a checkpoint must hold it (persistent); the step's counts are not state
        self.register_buffer("bias", torch.zeros(n_experts))
        self.register_buffer("step_load", torch.zeros(n_experts), persistent=False)

    def scores(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Affinities [N, E] in at least float32."""
        dtype = torch.promote_types(x_ND.dtype, torch.float32)  # bf16 logits would flip top-k ties
        logits_NE = F.linear(x_ND.to(dtype), self.weight.to(dtype))
        return logits_NE.sigmoid() if self.cfg.score_func == "sigmoid" else logits_NE.softmax(dim=-1)

    def select(self, scores_NE: torch.Tensor) -> torch.Tensor:
        """Expert ids [N, K]: the K highest biased affinities (the bias steers the choice, never the weights)."""
        return (scores_NE.detach() + self.bias.to(scores_NE.dtype)).topk(self.top_k, dim=-1).indices

    def forward(self, x_ND: torch.Tensor, seq_shape: tuple[int, int] | None = None):
        """x [N, D] -> (weights [N, K], experts [N, K], {"load": [E]}); seq_shape is unused here."""
        scores_NE = self.scores(x_ND)
        idx_NK = self.select(scores_NE)
        weights_NK = scores_NE.gather(1, idx_NK)
        if self.cfg.normalize:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        load_E = torch.bincount(idx_NK.flatten(), minlength=self.n_experts)
        if self.training:  # evaluation and generation must not move the balancing
            self.step_load += load_E.to(self.step_load.dtype)
        return weights_NK.to(x_ND.dtype), idx_NK, {"load": load_E}

    # -- side channels (the MoE layer delegates its aux_loss / step statistics / after-step update here) ----------
    def balance_loss(self) -> torch.Tensor | None:
        """No auxiliary loss: this router balances by its bias alone."""
        return None

    def load_tensors(self) -> list[torch.Tensor]:
        """The step's per-expert counts (a data-parallel strategy sums them over the ranks)."""
        return [self.step_load]

    def load_metrics(self) -> dict[str, float | list[float]]:
        """maxvio = max load / mean load - 1 (0: balanced) and the per-expert loads of the step."""
        total = float(self.step_load.sum())
        if total == 0.0:
            return {}
        return {
            "maxvio": float(self.step_load.max() / self.step_load.mean() - 1),
            "expert_load": self.step_load.tolist(),
        }

    @torch.no_grad()
    def end_step(self) -> None:
        """After the optimizer step: bias += speed * sign(mean load - load), then reset the counts."""
        if float(self.step_load.sum()) > 0:
            self.bias += self.cfg.bias_update_speed * torch.sign(self.step_load.mean() - self.step_load)
        self.step_load.zero_()
'''

TEST = '''\
"""$comp against dsk's router contract suite, plus its own balancing rule."""

import pytest
import torch
from dsk.api import ModelContext
from dsk.testing.contracts.model import check_config_round_trip, check_registration, check_router

from $pkg import plugin
from $pkg.config import $Config
from $pkg.router import $Class

CTX = ModelContext(dim=8, n_layers=1, vocab_size=16, max_seq_len=16, init_std=0.5)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_meets_the_router_contract(score_func):
    config = $Config(top_k=2, score_func=score_func)
    check_router(lambda: $Class(config, CTX, 6).double(), n_experts=6, dim=8, top_k=2)


def test_bias_rises_for_underloaded_experts():
    torch.manual_seed(0)
    router = $Class($Config(top_k=1, bias_update_speed=0.1), CTX, 4).train()
    router(torch.randn(32, 8))
    load = router.step_load.clone()
    router.end_step()
    assert torch.equal(router.bias > 0, load < load.mean())
    assert float(router.step_load.sum()) == 0


def test_config_round_trip():
    check_config_round_trip($Config, {"top_k": 3, "score_func": "softmax", "bias_update_speed": 0.0})


def test_registered_as_router():
    check_registration(plugin, "router", "$comp")
'''

RECIPE = {
    "model.ffn.router": 'type = "$comp"\ntop_k = 2',
}
