"""The sinkhorn router: top-k on a Sinkhorn-balanced assignment plan in training (S-BASE, Clark et al. 2022).

BASE layers solve token-to-expert routing as a balanced assignment; S-BASE approximates it with Sinkhorn-Knopp
iterations. From the logits ``s = x W^T`` the plan ``P = exp(s / tau)`` is scaled alternately by rows and columns
so that each token's row sums to 1 and each expert's column to ``N / E``: the nearest (in KL) plan in which every
expert receives the same share of the batch. In training each token takes the top_k experts of its row of ``P``;
in eval the top_k of its raw scores (``balanced_eval = false``, the default: a decoding step of one token has
nothing to balance against). The gate weights are always the raw scores (softmax or sigmoid of ``s``) of the
chosen experts, so the balancing steers the choice only and the gradient flows as in a plain top-k router.

For softmax scores, Sinkhorn on ``exp(s / tau)`` equals Sinkhorn on ``softmax(s) ** (1 / tau)``: the softmax
normaliser is a per-row factor, which the row scaling absorbs.

Contract (dsk docs/plugins.md, "router"): built as ``SinkhornRouter(config, ctx, n_experts)``; ``forward(x [N, D])``
returns (weights [N, K] in x's dtype, experts [N, K] int64, stats ``{"load": counts [E]}``). The MoE layer calls it
with ``seq_shape=(B, T)`` too and reaches the side channels under the router's names: ``balance_loss()``,
``load_tensors()`` (summed over data-parallel ranks), ``load_metrics()`` (MaxVio and the per-expert loads) and
``end_step()`` (once per optimizer step, never touching gradients).

Shape suffixes: N tokens, D model dim, E experts, K top_k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsk.api import ModelContext
from dsk.api.runtime import recomputing

from .config import SinkhornConfig

__all__ = ["SinkhornRouter", "sinkhorn_log"]


def sinkhorn_log(logits_NE: torch.Tensor, n_iters: int, tau: float = 1.0) -> torch.Tensor:
    """log P [N, E] of the plan ``exp(logits / tau)`` after ``n_iters`` row-then-column scalings.

    Targets: rows sum to 1 (each token routes one unit), columns to N / E (each expert takes an equal share). In the
    log domain, in at least float32 (exp of logits / tau overflows float32 long before the plan is balanced), and
    without gradient: the plan only selects. The last scaling is by columns, so the columns hold exactly and the rows
    approach 1 as the iterations converge.
    """
    n_tokens, n_experts = logits_NE.shape
    dtype = torch.promote_types(logits_NE.dtype, torch.float32)
    log_P_NE = logits_NE.detach().to(dtype) / tau
    log_col = math.log(n_tokens / n_experts)
    u_N1 = torch.zeros(n_tokens, 1, dtype=dtype, device=logits_NE.device)
    v_1E = torch.zeros(1, n_experts, dtype=dtype, device=logits_NE.device)
    for _ in range(n_iters):  # a loop over iterations, each one vectorised over tokens and experts
        u_N1 = -torch.logsumexp(log_P_NE + v_1E, dim=1, keepdim=True)  # rows -> 1
        v_1E = log_col - torch.logsumexp(log_P_NE + u_N1, dim=0, keepdim=True)  # columns -> N / E
    return log_P_NE + u_N1 + v_1E


class SinkhornRouter(nn.Module):
    """Linear gate; top-k on the Sinkhorn-balanced plan in training; gate weights from the raw scores.

    Parameters and buffers: ``weight [E, D]``; ``step_load [E]`` float32, not persistent: tokens routed to each
    expert by training forwards since the last :meth:`end_step`. The router has no balancing state to save: the
    plan is recomputed from each batch.
    """

    def __init__(self, config: SinkhornConfig, ctx: ModelContext, n_experts: int):
        super().__init__()
        if config.top_k > n_experts:
            raise ValueError(f"router.top_k = {config.top_k}: must be <= the {n_experts} routed experts")
        self.cfg = config
        self.n_experts = n_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(n_experts, ctx.dim))
        nn.init.normal_(self.weight, std=ctx.init_std)
        self.register_buffer("step_load", torch.zeros(n_experts, dtype=torch.float32), persistent=False)

    def logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Router logits s [N, E] in at least float32 (bf16 logits flip top-k ties)."""
        dtype = torch.promote_types(x_ND.dtype, torch.float32)
        with torch.autocast(x_ND.device.type, enabled=False):  # the gate GEMM stays in float32 under autocast
            return F.linear(x_ND.to(dtype), self.weight.to(dtype))

    def select(self, logits_NE: torch.Tensor, scores_NE: torch.Tensor) -> torch.Tensor:
        """Expert ids [N, K]: top_k of the balanced plan (training, or eval with balanced_eval), else of the scores."""
        if self.cfg.n_iters > 0 and (self.training or self.cfg.balanced_eval):
            plan_NE = sinkhorn_log(logits_NE, self.cfg.n_iters, self.cfg.tau)
        else:
            plan_NE = scores_NE.detach()
        return plan_NE.topk(self.top_k, dim=-1, sorted=False).indices

    def forward(
        self, x_ND: torch.Tensor, seq_shape: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x [N, D] -> (weights [N, K], experts [N, K], {"load": counts [E]}); seq_shape is unused (no loss)."""
        logits_NE = self.logits(x_ND)
        scores_NE = logits_NE.softmax(dim=-1) if self.cfg.score_func == "softmax" else logits_NE.sigmoid()
        idx_NK = self.select(logits_NE, scores_NE)
        weights_NK = scores_NE.gather(1, idx_NK)  # the only differentiable path: raw scores of the chosen experts
        if self.cfg.normalize:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        weights_NK = weights_NK * self.cfg.route_scale
        load_E = torch.bincount(idx_NK.flatten(), minlength=self.n_experts)
        # evaluation and generation must not count; a forward recomputed for the backward was counted the first time
        if self.training and not recomputing():
            self.step_load += load_E.to(self.step_load.dtype)
        return weights_NK.to(x_ND.dtype), idx_NK, {"load": load_E}

    # -- side channels (the MoE layer delegates its aux_loss / step statistics / after-step update here) ----------

    def balance_loss(self) -> torch.Tensor | None:
        """No auxiliary loss: the Sinkhorn plan balances the selection."""
        return None

    def load_tensors(self) -> list[torch.Tensor]:
        """The step's per-expert counts (a data-parallel strategy sums them over the ranks)."""
        return [self.step_load]

    def load_metrics(self) -> dict[str, float | list[float]]:
        """``maxvio`` = max load / mean load - 1 (0: balanced) and the per-expert ``expert_load`` of the step."""
        total = float(self.step_load.sum())
        if total == 0.0:
            return {}
        return {
            "maxvio": float(self.step_load.max() / self.step_load.mean() - 1.0),
            "expert_load": self.step_load.tolist(),
        }

    @torch.no_grad()
    def end_step(self) -> None:
        """After the optimizer step: reset the counts (nothing to update: the plan is recomputed every batch)."""
        self.step_load.zero_()

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would cast the counts too, and counts above 256 are not exact in bf16
        super()._apply(fn, recurse)
        if self.step_load.dtype != torch.float32:
            self.step_load = self.step_load.float()
        return self
