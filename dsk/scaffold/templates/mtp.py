"""Template of an ``mtp`` plugin: one extra-token prediction head sharing the embedding and the output head."""

SUMMARY = "one extra-token prediction head sharing the model's embedding and output head"
MODULE = "mtp"
TABLE = "[model.mtp]"
IMPL_NAME = "{Class}"
CONTRACT = "`dsk.testing.contracts.model.check_mtp`"

CONFIG = '''\
"""Options of the $comp MTP head: the [model.mtp] table. Torch-free; every field defaulted."""

from dsk.api import BaseConfig
from pydantic import Field


class $Config(BaseConfig):
    """One extra prediction depth: at position i, predict token i + 2 from h_i and the embedding of token i + 1."""

    loss_weight: float = Field(0.3, ge=0, description="weight of the extra-token loss added to the training loss")
'''

IMPL = '''\
"""The $comp MTP head: one extra depth that predicts the token after next (DeepSeek-V3 §2.2 with D = 1).

At position i it combines the main model's final hidden state h_i with the embedding of token t_(i+1), runs one
transformer block (made by the model's `block_factory`, so it is a block like the model's own) and scores
t_(i+2) with the model's output head:

    h'_i = proj(cat[norm_e(Emb(t_(i+1))), norm_h(h_i)]);   logits_i = Head(norm(Block(h')_i))

Contract (docs/plugins.md, "mtp"): built as `$Class(config, ctx, block_factory)`;
`forward(hidden [B, T, D], input_ids [B, T], embed, head, pos=, mask=)` returns one logits tensor per depth
(here one, [B, T - 1, V]); `loss(logits, labels [B, T])` a scalar. Add depths, or change what is combined, to make
it yours.
"""

import torch
import torch.nn.functional as F
from dsk.api import ModelContext
from dsk.api.runtime import IGNORE_INDEX, RMSNorm
from torch import nn

from .config import $Config


class $Class(nn.Module):
    """One extra-token head: two norms, a 2D -> D projection, a block and its final norm."""

    def __init__(self, config: $Config, ctx: ModelContext, block_factory):
        super().__init__()
        self.cfg = config
        self.embed_norm = RMSNorm(ctx.dim, ctx.norm_eps)
        self.hidden_norm = RMSNorm(ctx.dim, ctx.norm_eps)
        self.proj = nn.Linear(2 * ctx.dim, ctx.dim, bias=False)
        nn.init.normal_(self.proj.weight, std=ctx.init_std)
        self.block = block_factory(ctx.n_layers)  # the layer index after the main model's
        self.norm = RMSNorm(ctx.dim, ctx.norm_eps)

    def forward(self, hidden, input_ids, embed, head, *, pos=None, mask=None) -> list[torch.Tensor]:
        """hidden [B, T, D], input_ids [B, T] -> [logits [B, T - 1, V]] for the tokens t_(i+2)."""
        T = hidden.shape[1]
        n = max(T - 1, 0)  # positions whose next token t_(i+1) is known
        if pos is None:
            pos = torch.arange(T, device=hidden.device)
        emb = embed(input_ids[:, 1:])  # (B, T-1, D): Emb(t_(i+1))
        x = self.proj(torch.cat([self.embed_norm(emb), self.hidden_norm(hidden[:, :n])], dim=-1))  # (B, T-1, 2D) -> D
        h = self.block(x, pos[..., :n], mask[:, :n, :n] if mask is not None else None, None)
        return [head(self.norm(h))]

    def loss(self, logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of t_(i+2) (labels aligned with the inputs, -100 not a target), summed and divided by the
        main loss's target count, times loss_weight."""
        (lg,) = logits
        target = labels[:, 2:]  # t_(i+2) for i = 0 .. T-3; the last position has no target
        n_main = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        ce = F.cross_entropy(
            lg[:, : target.shape[1]].flatten(0, 1).float(),
            target.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return self.cfg.loss_weight * ce / n_main
'''

TEST = '''\
"""$comp against dsk's mtp contract suite (shapes, causality, gradients into the shared parts, state)."""

from dsk.api import ModelContext, build_component
from dsk.api.runtime import Block
from dsk.testing import builtin_registry
from dsk.testing.contracts.model import check_config_round_trip, check_mtp, check_registration

from $pkg import plugin
from $pkg.config import $Config
from $pkg.mtp import $Class

REGISTRY = builtin_registry()
CTX = ModelContext(dim=16, n_layers=1, vocab_size=12, max_seq_len=16, init_std=0.3)


def block(idx):
    """A block like the model's: dsk's built-in mha attention and dense FFN."""
    ctx = ModelContext(dim=16, n_layers=1, vocab_size=12, max_seq_len=16, layer_idx=idx, init_std=0.3)
    attention = build_component(REGISTRY, "attention", {"type": "mha", "n_heads": 2}, ctx)
    ffn = build_component(REGISTRY, "ffn", {"type": "dense", "hidden_dim": 12}, ctx)
    return Block(attention, ffn, 16)


def test_meets_the_mtp_contract():
    check_mtp(lambda: $Class($Config(), CTX, block).double(), dim=16, vocab_size=12)


def test_config_round_trip():
    check_config_round_trip($Config, {"loss_weight": 0.1})


def test_registered_as_mtp():
    check_registration(plugin, "mtp", "$comp")
'''

RECIPE = {
    "model.mtp": 'type = "$comp"\nloss_weight = 0.3',
}
