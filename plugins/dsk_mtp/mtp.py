"""Multi-token prediction (DeepSeek-V3 §2.2; spec §4.6): D sequential modules sharing embedding and head.

Module k (k = 1..D) at position i combines the previous depth's hidden state and the embedding of token
``t_{i+k}`` and predicts ``t_{i+k+1}``:

    h'^k_i = eh_proj( cat[ enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i) ] )      # embedding first, see MTP.md
    h^k    = TRM_k(h'^k)                                                  # one transformer block, causal
    P^k    = OutHead(shared_head.norm(h^k))

``h^0`` is the main model's final-norm output. Labels are aligned with the inputs (HF convention, as
``dsk.data.batching`` builds them: ``labels[:, t]`` is the token at t or -100), so depth k runs on positions
``i = 0 .. T-k-1`` with embeddings ``input_ids[:, k:]`` and scores its logits at ``i = 0 .. T-k-2`` against
``labels[:, k+1:]`` (the last position has no target inside the sequence; its logits serve speculative drafts).

Loss convention (the paper's 1/T): ``L^k = sum_i CE_i / N`` where N is the number of valid targets of the
main next-token loss (``labels[:, 1:] != -100``; T-1 per unpadded sequence), not the count of depth k's own
targets. So an MTP target weighs exactly as much as a main-model target, and with T >> D this equals the
per-depth mean up to a factor (T - 1 - k)/(T - 1). ``L_MTP = (lambda / D) sum_k L^k``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dsk.api import Cost, ModelContext
from dsk.api.runtime import IGNORE_INDEX, RMSNorm
from dsk_mtp.config import MTPConfig


class SharedHead(nn.Module):
    """The per-depth final norm before the shared output head (HF name ``shared_head.norm``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)


class MTPLayer(nn.Module):
    """One MTP module: norms, the 2D -> D projection M_k, one transformer block and its final norm."""

    def __init__(self, dim: int, eps: float, init_std: float, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(dim, eps)
        self.hnorm = RMSNorm(dim, eps)
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        nn.init.normal_(self.eh_proj.weight, std=init_std)
        self.block = block
        self.shared_head = SharedHead(dim, eps)

    def forward(
        self,
        h_prev: torch.Tensor,
        emb: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: Any = None,
    ) -> torch.Tensor:
        """h_prev [B,T,D] (h^{k-1}), emb [B,T,D] (Emb(t_{i+k})), pos [T] | [B,T] -> h^k [B,T,D] (before the norm)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))  # (B, T, 2D) -> (B, T, D)
        return self.block(x, pos, mask, cache)


class MTP(nn.Module):
    """D sequential MTP modules; embedding and output head are the main model's, passed to ``forward``.

    Built as ``MTP(config, ctx, block_factory)``; block k is ``block_factory(ctx.n_layers + k)`` so its layer
    index is the one the HF checkpoint uses (``model.layers.{num_hidden_layers + k}``). It offers the drafter
    ``"mtp"`` for speculative decoding (a ``dsk.api.generation.BatchDrafterProvider``, see :mod:`dsk_mtp.speculative`).
    """

    drafter_name = "mtp"  # the name this component is registered under (dsk_mtp.plugin)

    def __init__(self, config: MTPConfig, ctx: ModelContext, block_factory: Callable[[int], nn.Module]):
        super().__init__()
        self.depth = config.depth
        self.loss_weight = config.loss_weight
        self.layers = nn.ModuleList(
            MTPLayer(ctx.dim, ctx.norm_eps, ctx.init_std, block_factory(ctx.n_layers + k)) for k in range(config.depth)
        )

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        embed: nn.Module,
        head: Callable[[torch.Tensor], torch.Tensor],
        *,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Logits of every depth over a whole sequence (training; no cache).

        Args:
            hidden: [B, T, D] the main model's final-norm hidden states h^0.
            input_ids: [B, T] the main model's input tokens.
            embed: the shared token embedding.
            head: the shared output head, [..., D] -> [..., V].
            pos: [T] (or [B, T]) positions of the main sequence (default arange(T)).
            mask: [B, T, T] bool mask of the main sequence (True = may attend) or None (causal).

        Returns:
            D tensors; depth k's is [B, T-k, V]: logits for tokens t_{i+k+1}, i = 0..T-k-1 (the last one lies
            past the sequence: no target, but it is the draft a generator would take).
        """
        B, T, _ = hidden.shape
        if pos is None:
            pos = torch.arange(T, device=hidden.device)
        emb = embed(input_ids)  # (B, T, D), shared by all depths
        h = hidden
        logits = []
        for k, layer in enumerate(self.layers, start=1):
            n = max(T - k, 0)  # positions with a known t_{i+k}
            m = mask[:, :n, :n] if mask is not None else None
            h = layer(h[:, :n], emb[:, k : k + n], pos[..., :n], m)
            logits.append(head(layer.shared_head.norm(h)))  # (B, T-k, V)
        return logits

    def loss(
        self, logits: list[torch.Tensor], labels: torch.Tensor, *, per_depth: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """``L_MTP = (lambda/D) sum_k L^k`` with the 1/T convention of the module docstring.

        Args:
            logits: ``forward``'s output, depth k [B, T-k, V].
            labels: [B, T] main-model labels aligned with the inputs (-100 = not a target).
            per_depth: also return the unweighted L^k of each depth.
        """
        n_main = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        depth_losses = []
        for k, lg in enumerate(logits, start=1):
            target = labels[:, k + 1 :]  # token i+k+1 for positions i = 0 .. T-k-2
            flat = rearrange(lg[:, : target.shape[1]], "b t v -> (b t) v")
            flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
            ce = F.cross_entropy(flat, rearrange(target, "b t -> (b t)"), ignore_index=IGNORE_INDEX, reduction="sum")
            depth_losses.append(ce / n_main.to(ce.dtype))
        total = torch.stack(depth_losses).sum() * (self.loss_weight / self.depth)
        return (total, depth_losses) if per_depth else total

    # -- analytic cost (dsk.api.CostModel) ---------------------------------------------------------
    def cost(self, seq_len: int, act_bytes: int = 2) -> Cost:
        """The modules' own parts per token (:class:`dsk.api.CostModel`): per depth the norms ``enorm``,
        ``hnorm`` and ``shared_head.norm`` and the projection M_k (2D -> D, ``4 * D * D`` FLOPs). Each block's
        attention and FFN report themselves; the shared embedding and head are the main model's, so the head's
        FLOPs and logits are the core's, once per depth (``head_calls_per_token``).

        Per main-model token: depth k runs on ``seq_len - k`` of the ``seq_len`` positions, and this counts it on
        all of them (a ``k / seq_len`` overestimate, as its blocks' own costs are).

        Recomputable ``"norm"`` bytes: each norm's normalised value and statistic, and ``shared_head.norm``'s output,
        which the head saves as its input (the ``enorm`` and ``hnorm`` outputs are concatenated into a new tensor).
        These norms run outside the transformer blocks that recomputation wraps, so it leaves them alone.
        """
        n = len(self.layers)
        if n == 0:
            return Cost()
        D = self.layers[0].eh_proj.weight.shape[1] // 2
        per_depth = 3 * D + 2 * D * D
        # saved per depth: each of the three norms' input and normalised value (2D, and a float32 statistic), the
        # projection's input (2D)
        return Cost(
            params=n * per_depth,
            active_params=n * per_depth,
            flops_per_token=n * 4.0 * D * D,
            activation_bytes_per_token=float(n * (8 * D * act_bytes + 3 * 4)),
            head_calls_per_token=float(n),
            recomputable_bytes_per_token={"norm": float(n * (4 * D * act_bytes + 3 * 4))},
        )

    # -- speculative decoding ----------------------------------------------------------------------
    def make_batch_drafter(self, model: nn.Module, batch: int, max_len: int) -> Any:
        """A :class:`dsk_mtp.speculative.MTPDrafter` for ``batch`` rows of at most ``max_len`` tokens of ``model``."""
        from dsk_mtp.speculative import MTPDrafter

        return MTPDrafter(self, model, batch, max_len)

    def make_caches(
        self, batch: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> list[Any]:
        """One attention cache per depth (each MTP block attends over its own earlier positions)."""
        return [layer.block.self_attn.make_cache(batch, max_len, device, dtype) for layer in self.layers]

    def step(
        self,
        k: int,
        h_prev: torch.Tensor,
        tokens: torch.Tensor,
        embed: nn.Module,
        head: Callable[[torch.Tensor], torch.Tensor],
        pos: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run depth ``k`` (1-based) on a chunk, appending to its cache.

        Args:
            h_prev: [B, T, D] h^{k-1} at the chunk's positions.
            tokens: [B, T] t_{i+k} for the chunk's positions i.
            pos: [T] (or [B, T]) the positions i.

        Returns:
            (h^k [B, T, D], logits [B, T, V] for t_{i+k+1}).
        """
        layer = self.layers[k - 1]
        h = layer(h_prev, embed(tokens), pos, mask, cache)
        return h, head(layer.shared_head.norm(h))
