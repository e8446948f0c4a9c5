"""The GRPO loss as pure functions: rewards -> advantages -> per-token clipped surrogate (+ k3 KL) -> aggregation.

Reference: docs/post-training.md and the notes in shared/reference/post_training.md §1 (TRL's GRPOTrainer, verl's
core_algos) and deepseek_v3_r1_spec.md §5.1 (DeepSeekMath's objective). Shapes: N completions (= prompts x G),
G completions per group, T completion tokens, K reward functions. Every function is vectorised; none loops over
tokens or completions.

The four aggregations differ only in the normaliser of the summed masked token losses (notes §1.2); with
``len_i`` the active tokens of completion i, B the completions of the micro-batch, L = max_completion_length,
A the gradient-accumulation steps and N_glob the active tokens of the whole optimizer step (all micro-batches,
all ranks), P the processes:

=========  ============================================  =================================================
grpo       (1/B) sum_i sum_t l_it / max(len_i, 1), / A   DeepSeekMath: per-sequence mean (length-biased)
bnpo       sum_it l_it / max(sum_it M, 1), / A           token mean of the local micro-batch
dr_grpo    sum_it l_it / (B * L), / A                    Dr. GRPO: constant normaliser, no length bias
dapo       sum_it l_it / (N_glob / P)                    exact token mean over the optimizer step (TRL default)
=========  ============================================  =================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "LOSS_TYPES",
    "Advantages",
    "TokenLoss",
    "aggregate",
    "clipped_surrogate",
    "combine_rewards",
    "group_advantages",
    "k3_kl",
    "token_entropy",
    "token_logprobs",
]

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")


# --------------------------------------------------------------------------------------------------------------
# rewards -> advantages
# --------------------------------------------------------------------------------------------------------------
def combine_rewards(rewards_NK: torch.Tensor, weights_K: torch.Tensor) -> torch.Tensor:
    """Weighted sum of K reward functions per completion, ``r_i = sum_k w_k r_ik``, skipping NaN (= None).

    rewards_NK [N, K] (NaN where a function returned None), weights_K [K] -> [N]; a row where every function
    returned None stays NaN, so it is left out of its group's statistics (TRL's nansum rule).
    """
    weighted = rewards_NK * weights_K.to(rewards_NK.dtype)
    total = torch.nansum(weighted, dim=1)
    return total.masked_fill(torch.isnan(rewards_NK).all(dim=1), float("nan"))


def _nan_mean_std(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-aware mean and Bessel-corrected std along ``dim`` (NaN where fewer than 1 / 2 values are valid)."""
    valid = ~torch.isnan(x)
    n = valid.sum(dim, keepdim=True).to(x.dtype)
    zero = torch.zeros_like(x)
    mean = torch.where(valid, x, zero).sum(dim, keepdim=True) / n  # NaN (0/0) for an all-None group
    sq = torch.where(valid, (x - mean) ** 2, zero).sum(dim, keepdim=True)
    std = (sq / (n - 1)).sqrt()  # n = 1: 0/0 = NaN, n = 0: NaN
    return mean, std


@dataclass
class Advantages:
    """Output of :func:`group_advantages`.

    Attributes:
        advantages: [N], 0 where the reward was None (no learning signal from that completion).
        group_mean: [N/G] mean reward per group (NaN for a group of Nones).
        group_std: [N/G] reward std per group (Bessel-corrected).
        zero_std: [N/G] bool, the group's valid rewards are all equal: no learning signal (``frac_reward_zero_std``).
    """

    advantages: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    zero_std: torch.Tensor


def group_advantages(
    rewards_N: torch.Tensor, group_size: int, scale: ScaleRewards = "group", eps: float = 1e-4
) -> Advantages:
    """GRPO's outcome advantage ``A_i = (r_i - mean_g) / (std + eps)`` (DeepSeekMath §4.1.2, TRL defaults).

    Args:
        rewards_N: [N] summed rewards, NaN for "not applicable"; consecutive runs of ``group_size`` are one group.
        group_size: G.
        scale: ``group`` divides by the group's std, ``batch`` by the std of all valid rewards (Lite-PPO), ``none``
            does not divide (Dr. GRPO).
        eps: added to the std so an all-equal group gives 0, not 0/0.

    NaN rewards are left out of the mean and std, and their advantage is 0.
    """
    if rewards_N.dim() != 1 or rewards_N.numel() % group_size:
        raise ValueError(f"{tuple(rewards_N.shape)} rewards do not split into groups of {group_size}")
    r_GS = rewards_N.view(-1, group_size)  # (groups, G)
    mean_G1, std_G1 = _nan_mean_std(r_GS, dim=1)
    centred = r_GS - mean_G1
    if scale == "group":
        adv = centred / (std_G1 + eps)
    elif scale == "batch":
        _, std_all = _nan_mean_std(rewards_N, dim=0)
        adv = centred / (std_all + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"scale_rewards = {scale!r}: must be 'group', 'batch' or 'none'")
    adv = torch.nan_to_num(adv, nan=0.0, posinf=0.0, neginf=0.0).reshape(-1)
    zero_std = torch.isclose(std_G1, torch.zeros_like(std_G1)).squeeze(1)
    # a group with a single valid reward has no spread either (its std is NaN, its advantage 0)
    single = (~torch.isnan(r_GS)).sum(1) == 1
    return Advantages(adv, mean_G1.squeeze(1), std_G1.squeeze(1), zero_std | single)


# --------------------------------------------------------------------------------------------------------------
# per-token terms
# --------------------------------------------------------------------------------------------------------------
def token_logprobs(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[id] per position: [B, T, V], [B, T] -> [B, T] (float32 at least, as the loss needs).

    Computed as ``logit[id] - logsumexp(logits)`` so no [B, T, V] log-softmax tensor is materialised twice.
    """
    logits = logits_BTV.to(torch.promote_types(logits_BTV.dtype, torch.float32))
    picked = logits.gather(-1, ids_BT.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_entropy(logits_BTV: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position: [B, T, V] -> [B, T]."""
    logp = torch.log_softmax(logits_BTV.to(torch.promote_types(logits_BTV.dtype, torch.float32)), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per sampled token, always >= 0 (DeepSeekMath eq. 4).

    ``D = exp(x) - x - 1`` with ``x = log pi_ref - log pi_theta``; unbiased for the KL when tokens are sampled from
    pi_theta, and low-variance because it is non-negative.
    """
    x = ref_logp_BT - logp_BT
    return torch.exp(x) - x - 1


@dataclass
class TokenLoss:
    """Output of :func:`clipped_surrogate`: the per-token loss and the clipping indicators (all [B, T])."""

    loss: torch.Tensor
    ratio: torch.Tensor
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor
    kl: torch.Tensor | None = None


def clipped_surrogate(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    ref_logp_BT: torch.Tensor | None = None,
    beta: float = 0.0,
) -> TokenLoss:
    """Per-token PPO-clip loss of GRPO, plus ``beta`` times the k3 KL to a reference.

    ``l_it = -min(rho_it A_i, clip(rho_it, 1 - epsilon, 1 + epsilon_high) A_i) + beta D_it`` with
    ``rho_it = exp(logp_it - old_logp_it)``. ``delta`` (INTELLECT-2) caps the unclipped branch at ``min(rho, delta)``.
    The same scalar advantage of completion i is broadcast to its tokens.

    Args:
        logp_BT: log-probs of the sampled tokens under the current policy (with gradient).
        old_logp_BT: the same under the policy that sampled them (no gradient).
        advantages_B: one advantage per completion.
        epsilon, epsilon_high: lower and upper clip bounds (``epsilon_high`` defaults to ``epsilon``; DAPO's
            clip-higher uses 0.28).
        ref_logp_BT: log-probs under the frozen reference (needed when ``beta > 0``).
        beta: KL coefficient (R1-Zero: 0.001; TRL default 0).
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp_BT - old_logp_BT.detach())
    adv = advantages_B.to(logp_BT.dtype)[:, None]  # (B, 1), broadcast over tokens
    unclipped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    loss = -torch.min(unclipped_ratio * adv, clipped_ratio * adv)
    kl = None
    if beta != 0.0:
        if ref_logp_BT is None:
            raise ValueError("beta > 0 needs the reference log-probs (ref_logp_BT)")
        kl = k3_kl(logp_BT, ref_logp_BT.detach())
        loss = loss + beta * kl
    # a token is clipped where the clipped branch won the min and carries no gradient
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    return TokenLoss(loss=loss, ratio=ratio, low_clipped=low, high_clipped=high, kl=kl)


# --------------------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------------------
def aggregate(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    loss_type: LossType,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    grad_accum_steps: int = 1,
    num_processes: int = 1,
    batch_size: int | None = None,
    local_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce per-token losses of one micro-batch to the scalar that is back-propagated (table in the module doc).

    Args:
        loss_BT: per-token losses [B, T].
        mask_BT: 1 on active completion tokens, 0 on padding and masked completions.
        loss_type: ``grpo``, ``bnpo``, ``dr_grpo`` or ``dapo``.
        max_completion_length: L, for ``dr_grpo``.
        num_items_in_batch: N_glob, the active tokens of the whole optimizer step over all ranks, for ``dapo``
            (default: this micro-batch's count, i.e. one micro-batch per step).
        grad_accum_steps: A, the micro-batches per optimizer step (``dapo`` needs no division: its normaliser
            already counts every micro-batch).
        num_processes: P; data parallelism averages gradients over P, which ``dapo``'s ``/P`` undoes.
        batch_size: B of the micro-batch when ``loss_BT`` holds only some of its rows (default: its row count). A
            trainer may leave out rows whose loss is identically zero (advantage 0, no KL) and still get the exact
            normaliser of the whole micro-batch.
        local_tokens: the micro-batch's active tokens for ``bnpo`` under the same circumstance (default:
            ``mask_BT.sum()``).

    Summing the ``dapo`` results of the micro-batches of a step gives exactly the loss of the whole batch at once.
    """
    mask = mask_BT.to(loss_BT.dtype)
    masked = loss_BT * mask
    B = loss_BT.shape[0] if batch_size is None else batch_size
    if loss_type == "grpo":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(B, 1) / grad_accum_steps
    if loss_type == "bnpo":
        tokens = mask.sum() if local_tokens is None else torch.as_tensor(local_tokens, dtype=loss_BT.dtype)
        return masked.sum() / tokens.clamp(min=1.0) / grad_accum_steps
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        return masked.sum() / (B * max_completion_length) / grad_accum_steps
    if loss_type == "dapo":
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=loss_BT.dtype)
        return masked.sum() / (n / num_processes).clamp(min=1.0 / num_processes)
    raise ValueError(f"loss_type = {loss_type!r}: must be one of {', '.join(LOSS_TYPES)}")
