"""MoE routers: top-k expert selection, routing weights, load accounting and balance losses.

Three routers share one base (:class:`TopKRouter`):

* ``noaux_tc`` (:class:`NoauxTCRouter`): DeepSeek-V3. Sigmoid affinities, group-limited top-k on the
  bias-corrected scores, auxiliary-loss-free balancing by the sign rule on ``e_score_correction_bias`` (spec §4.2,
  §4.3) and the complementary sequence-wise balance loss (spec §4.4, eqs 17-20).
* ``aux_loss`` (:class:`AuxLossRouter`): the Switch/GShard baseline, ``alpha * E * sum_i f_i P_i`` over the batch.
* ``greedy`` (:class:`GreedyRouter`): plain top-k, no balancing (ablations).

Every router is built as ``Router(cfg, ctx, n_experts)`` and called as ``forward(x_ND, seq_shape=(B, T))``; it
returns ``(weights_NK, idx_NK, {"load": load_E})``. ``seq_shape`` tells the sequence-wise loss where the
sequences of the flattened batch start; without it the N tokens count as one sequence.

Side channels are named ``balance_loss / load_tensors / end_step / load_metrics`` here, not with the contract's
``aux_loss / step_stat_tensors / after_optimizer_step / step_metrics``: the MoE layer owns the contract names and
delegates to these, so that a trainer walking ``model.modules()`` finds each side channel exactly once.

Shape suffixes: N tokens (B*T flattened), D model dim, E routed experts, K experts per token (top_k),
G expert groups, M groups kept per token (topk_groups), B sequences, T tokens per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsk.api import ModelContext
from dsk.api.runtime import cpu_kernel_supports, recomputing

from . import kernels
from .config import AuxLossConfig, GreedyConfig, NoauxTCConfig, router_fit_problems

__all__ = ["TopKRouter", "GreedyRouter", "AuxLossRouter", "NoauxTCRouter"]

# HF DeepseekV3TopkRouter adds this to the denominator when renormalising; kept for bit-level parity.
_NORM_EPS = 1e-20


class TopKRouter(nn.Module):
    """Linear gate + affinity function + top-k, with per-step expert-load accounting.

    Parameters and buffers (HF names): ``weight [E, D]`` (``mlp.gate.weight``); ``step_load [E]`` float32, not
    persistent: tokens routed to each expert by training forwards since the last :meth:`end_step`.
    """

    # Buffers kept in float32 whatever `module.to(dtype)` asks for (see `_apply`).
    _fp32_buffers: tuple[str, ...] = ("step_load",)

    def __init__(self, cfg: GreedyConfig, ctx: ModelContext, n_experts: int):
        super().__init__()
        problems = router_fit_problems(cfg, n_experts)
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        self.n_experts = n_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(n_experts, ctx.dim))
        nn.init.normal_(self.weight, mean=0.0, std=ctx.init_std)
        self.register_buffer("step_load", torch.zeros(n_experts, dtype=torch.float32), persistent=False)
        self._loss: torch.Tensor | None = None

    # -- routing ---------------------------------------------------------------------------------------------

    def forward(
        self, x_ND: torch.Tensor, seq_shape: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Route N tokens.

        Args:
            x_ND: token activations [N, D].
            seq_shape: (B, T) with B * T = N when the tokens are B sequences of T; None = one sequence.

        Returns:
            weights_NK (dtype of x), idx_NK (long, expert ids), stats ``{"load": load_E}`` (long token counts of
            this call), plus ``"order"`` (the N*K slots sorted by expert, as ``argsort(idx_NK.flatten(),
            stable=True)``) when the CPU routing kernel selected.
        """
        scores_NE = self.scores(x_ND)
        # Selection never carries gradient (top-k is piecewise constant); only the gathered weights do.
        fused_loss: torch.Tensor | None = None
        alpha = self._seq_loss_alpha() if self.training else None
        if cpu_kernel_supports(scores_NE) and kernels.EXTENSION.load() is not None:
            # one pass: selection, and the slots sorted by expert that the MoE layer's dispatch needs; then one
            # for the weights and (noaux_tc) the sequence-wise loss
            idx_NK, order_R, load_E = kernels.route_topk(scores_NE, *self._kernel_routing())
            weights_NK, fused_loss = kernels.route_weights(
                scores_NE, idx_NK, self.cfg.norm_topk_prob, self.cfg.route_scale, alpha or 0.0, seq_shape
            )
        else:
            idx_NK, order_R, alpha = self.select(scores_NE.detach()), None, None
            load_E = torch.bincount(idx_NK.flatten(), minlength=self.n_experts)
            weights_NK = scores_NE.gather(1, idx_NK)
            if self.cfg.norm_topk_prob:
                weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + _NORM_EPS)
            weights_NK = weights_NK * self.cfg.route_scale
        if self.training:
            # Eval and generation forwards must not move the balancing bias, so only training counts; a forward
            # run again by activation recomputation counts nothing (its tokens were counted the first time) and
            # keeps the first forward's loss, but computes it all the same so the recomputed ops are the same ops.
            again = recomputing()
            if not again:
                self.step_load += load_E.to(self.step_load.dtype)
            loss = fused_loss if alpha is not None else self.compute_balance_loss(scores_NE, idx_NK, load_E, seq_shape)
            if not again:
                self._loss = loss
        else:
            self._loss = None
        stats = {"load": load_E} if order_R is None else {"load": load_E, "order": order_R}
        return weights_NK.to(x_ND.dtype), idx_NK, stats

    def scores(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Affinities s [N, E] in at least float32 (HF runs the router GEMM in fp32: bf16 logits flip top-k ties)."""
        dtype = torch.promote_types(x_ND.dtype, torch.float32)
        # autocast would run this GEMM in bf16 whatever the casts say: keep it out (DeepSeek-V3's gate stays fp32)
        with torch.autocast(x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.to(dtype), self.weight.to(dtype))
        if self.cfg.score_func == "sigmoid":
            return logits_NE.sigmoid()
        return logits_NE.softmax(dim=-1)

    def select(self, scores_NE: torch.Tensor) -> torch.Tensor:
        """Expert ids [N, K] of the K highest affinities (unsorted)."""
        return scores_NE.topk(self.top_k, dim=-1, sorted=False).indices

    def _kernel_routing(self) -> tuple[torch.Tensor | None, int, int, int, bool]:
        """The selection :meth:`select` makes, as arguments of :func:`dsk_moe.kernels.route_topk`."""
        return None, 1, 1, self.top_k, True

    def _seq_loss_alpha(self) -> float | None:
        """alpha when the balance loss is the sequence-wise loss :func:`dsk_moe.kernels.route_weights` computes
        (then the kernel path computes it too), None when :meth:`compute_balance_loss` defines another."""
        return None

    # -- balance loss ----------------------------------------------------------------------------------------

    def compute_balance_loss(
        self,
        scores_NE: torch.Tensor,
        idx_NK: torch.Tensor,
        load_E: torch.Tensor,
        seq_shape: tuple[int, int] | None,
    ) -> torch.Tensor | None:
        """Weighted balance loss of one forward, or None when the router has none."""
        return None

    def balance_loss(self) -> torch.Tensor | None:
        """Weighted balance loss of the last training forward (None in eval or when disabled)."""
        return self._loss

    # -- step accounting -------------------------------------------------------------------------------------

    def load_tensors(self) -> list[torch.Tensor]:
        """Buffers a data-parallel strategy all-reduces (sums) before :meth:`end_step`: the step's expert load."""
        return [self.step_load]

    def load_metrics(self) -> dict[str, float | list[float]]:
        """``maxvio`` = max load / mean load - 1 over the step (0 = perfect balance) and ``expert_load``.

        Empty when no training forward ran since the last :meth:`end_step`. One host sync, once per step.
        """
        load_E = self.step_load
        total = float(load_E.sum())
        if total == 0.0:
            return {}
        return {"maxvio": float(load_E.max() / load_E.mean() - 1.0), "expert_load": load_E.tolist()}

    @torch.no_grad()
    def end_step(self) -> None:
        """Close the step: update balancing state from the step's load, then reset the counts."""
        self.step_load.zero_()

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would cast floating buffers too; counts above 256 and bias steps of 1e-3 are
        # lost in bf16 (HF keeps e_score_correction_bias fp32 the same way, via _keep_in_fp32_modules_strict).
        super()._apply(fn, recurse)
        for name in self._fp32_buffers:
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32 and buf.is_floating_point():
                self._buffers[name] = buf.float()
        return self


class GreedyRouter(TopKRouter):
    """Plain top-k over the affinities, no balancing (for ablations: shows what the balancers buy)."""


class AuxLossRouter(TopKRouter):
    """Top-k routing balanced by the Switch/GShard auxiliary loss over the whole batch.

    ``L = alpha * E * sum_i f_i P_i`` with ``f_i = c_i / (N K)`` the fraction of the N*K routed slots sent to
    expert i (no gradient) and ``P_i`` the mean over the N tokens of the affinities normalised over all experts
    (the gradient path). Uniform routing gives ``L = alpha``.
    """

    cfg: AuxLossConfig

    def compute_balance_loss(self, scores_NE, idx_NK, load_E, seq_shape):
        if self.cfg.aux_alpha == 0:
            return None
        n_tokens = scores_NE.shape[0]
        probs_NE = scores_NE / scores_NE.sum(dim=-1, keepdim=True)  # a no-op for softmax, needed for sigmoid
        f_E = load_E.to(scores_NE.dtype) / (n_tokens * self.top_k)
        P_E = probs_NE.mean(dim=0)
        return self.cfg.aux_alpha * self.n_experts * (f_E * P_E).sum()


class NoauxTCRouter(TopKRouter):
    """DeepSeek-V3 router: group-limited top-k on bias-corrected scores, bias balancing, sequence-wise loss.

    Buffers: ``e_score_correction_bias [E]`` float32, persistent (HF name ``mlp.gate.e_score_correction_bias``;
    the reference code calls it ``gate.bias``). It is a buffer, not a Parameter: it is never trained by gradient
    and stays out of ``parameters()`` and hence out of the optimizer.
    """

    _fp32_buffers = ("step_load", "e_score_correction_bias")

    def __init__(self, cfg: NoauxTCConfig, ctx: ModelContext, n_experts: int):
        super().__init__(cfg, ctx, n_experts)
        self.n_groups = cfg.n_groups
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))

    def select(self, scores_NE: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k on ``s + b`` exactly as HF ``DeepseekV3TopkRouter`` (spec §1.7 step 2-4, §4.5).

        Groups are ranked by the sum of their two best biased scores (``group_score = "top2_sum"``; ``"max"``
        is the reference code's bias-free rule), the ``topk_groups`` best are kept and the experts of the other
        groups are masked with ``-inf``. The reference code uses -inf since commit 1398800 and current HF
        transformers (v5) does too; older HF versions masked with 0.0, which differs only when every kept
        candidate's biased score is negative (bias < -s), where 0.0 would let a masked expert win. -inf
        guarantees the token never leaves its M groups, which is what node-limited routing promises.
        """
        choice_NE = scores_NE + self.e_score_correction_bias  # bias steers selection only (spec §4.2)
        n_tokens, n_experts = choice_NE.shape
        if self.n_groups > 1:
            choice_NGe = choice_NE.view(n_tokens, self.n_groups, n_experts // self.n_groups)  # n (g e) -> n g e
            if self.cfg.group_score == "top2_sum":
                # best + second best: the same two values topk(2) would sum (ties included), in half the time
                # of CPU topk over these short rows
                best_NG, arg_NG = choice_NGe.max(dim=-1)
                second_NG = choice_NGe.scatter(-1, arg_NG.unsqueeze(-1), float("-inf")).amax(dim=-1)
                group_NG = best_NG + second_NG
            else:
                group_NG = choice_NGe.amax(dim=-1)
            keep_NM = group_NG.topk(self.cfg.topk_groups, dim=-1, sorted=False).indices
            keep_NG = torch.zeros_like(group_NG, dtype=torch.bool).scatter_(1, keep_NM, True)
            choice_NE = choice_NGe.masked_fill(~keep_NG.unsqueeze(-1), float("-inf")).view(n_tokens, n_experts)
        return choice_NE.topk(self.top_k, dim=-1, sorted=False).indices

    def _seq_loss_alpha(self) -> float | None:
        return self.cfg.seq_aux_alpha

    def _kernel_routing(self) -> tuple[torch.Tensor | None, int, int, int, bool]:
        groups = (self.n_groups, self.cfg.topk_groups) if self.n_groups > 1 else (1, 1)
        return self.e_score_correction_bias, *groups, self.top_k, self.cfg.group_score == "top2_sum"

    def compute_balance_loss(self, scores_NE, idx_NK, load_E, seq_shape):
        """Complementary sequence-wise balance loss (spec §4.4, eqs 17-20), averaged over the B sequences.

        ``f_i = N_r / (K_r T) * #{t : i selected for t}`` over the *selected* (bias-corrected, group-limited)
        set, as most reimplementations do (eq. 18 literally writes TopK of the unbiased s); ``P_i = mean_t s'_i``
        with ``s'`` normalised over all routed experts. f carries no gradient, P does.
        """
        alpha = self.cfg.seq_aux_alpha
        if alpha == 0:
            return None
        n_tokens, n_experts = scores_NE.shape
        n_seqs, seq_len = seq_shape if seq_shape is not None else (1, n_tokens)
        probs_BTE = (scores_NE / scores_NE.sum(dim=-1, keepdim=True)).view(n_seqs, seq_len, n_experts)
        P_BE = probs_BTE.mean(dim=1)
        # Per-sequence selection counts with one bincount over (sequence, expert) ids; a scatter_add into [B, E]
        # serialises on the collisions and costs more than the router GEMM on CPU.
        seq_N1 = (torch.arange(n_tokens, device=idx_NK.device) // seq_len).unsqueeze(1)
        count_BE = torch.bincount((seq_N1 * n_experts + idx_NK).flatten(), minlength=n_seqs * n_experts)
        count_BE = count_BE.view(n_seqs, n_experts).to(P_BE.dtype)
        f_BE = count_BE * (n_experts / (self.top_k * seq_len))
        return alpha * (f_BE * P_BE).sum(dim=-1).mean()

    @torch.no_grad()
    def end_step(self) -> None:
        """Sign rule ``b_i += gamma * sign(mean(c) - c_i)`` from the step's counts c, then reset c (spec §4.3).

        Overloaded experts (c_i above the mean) get a lower bias, underloaded ones a higher; an expert exactly at
        the mean is left alone. The rule is invariant to scaling c, so counts doubled by activation recompute or
        summed over data-parallel ranks give the same update. Runs under no_grad and touches no ``.grad``.
        """
        load_E = self.step_load
        gamma = self.cfg.bias_update_speed
        if gamma > 0:
            self.e_score_correction_bias.add_(torch.sign(load_E.mean() - load_E), alpha=gamma)
        load_E.zero_()
