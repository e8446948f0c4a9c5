"""The GRPO loss pieces on hand-made inputs: aggregations, clipping, the k3 KL, advantages with None rewards."""

import math

import pytest
import torch
from dsk_rl.grpo_loss import (
    aggregate,
    clipped_surrogate,
    combine_rewards,
    group_advantages,
    k3_kl,
    token_entropy,
    token_logprobs,
)

NAN = float("nan")


def worked_vector():
    """Two completions of lengths 1 and 3, advantages +1 and -1, rho = 1, beta = 0 (post_training.md §1.2)."""
    logp = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    token = clipped_surrogate(logp, logp.detach(), adv)
    return token.loss, mask


@pytest.mark.parametrize(("loss_type", "expected"), [("grpo", 0.0), ("bnpo", 0.5), ("dapo", 0.5), ("dr_grpo", 0.25)])
def test_worked_vector_gives_the_documented_loss_per_aggregation(loss_type, expected):
    loss, mask = worked_vector()
    value = aggregate(loss, mask, loss_type, max_completion_length=4)
    assert value.item() == pytest.approx(expected, abs=1e-12)


def test_per_token_loss_is_minus_the_advantage_when_the_ratio_is_one():
    loss, mask = worked_vector()
    assert torch.equal(loss[0], torch.full((4,), -1.0, dtype=torch.float64))
    assert torch.equal(loss[1], torch.full((4,), 1.0, dtype=torch.float64))


def test_gradient_flows_through_the_ratio_even_when_it_equals_one():
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    token = clipped_surrogate(logp, logp.detach(), torch.tensor([2.0], dtype=torch.float64))
    aggregate(token.loss, torch.ones(1, 2), "dapo").backward()
    # d(-rho A)/d logp = -rho A = -2 per token, averaged over 2 tokens
    assert torch.allclose(logp.grad, torch.full((1, 2), -1.0, dtype=torch.float64))


def test_grad_accumulation_divides_every_aggregation_but_dapo():
    loss, mask = worked_vector()
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        one = aggregate(loss, mask, loss_type, max_completion_length=4)
        two = aggregate(loss, mask, loss_type, max_completion_length=4, grad_accum_steps=2)
        assert two.item() == pytest.approx(one.item() / 2)
    assert aggregate(loss, mask, "dapo", grad_accum_steps=2).item() == pytest.approx(0.5)


def test_dapo_is_invariant_to_splitting_the_step_into_micro_batches():
    torch.manual_seed(0)
    B, T = 6, 5
    loss = torch.randn(B, T, dtype=torch.float64)
    mask = (torch.rand(B, T) > 0.3).double()
    mask[2] = 0  # a fully masked completion
    whole = aggregate(loss, mask, "dapo")
    n_glob = mask.sum()
    for splits in ([1, 5], [2, 2, 2], [3, 3], [1, 1, 1, 1, 1, 1]):
        parts = torch.split(torch.arange(B), splits)
        total = sum(aggregate(loss[p], mask[p], "dapo", num_items_in_batch=n_glob) for p in parts)
        assert total.item() == pytest.approx(whole.item(), rel=1e-12)


def test_dapo_divides_by_the_per_process_share_of_the_global_tokens():
    loss, mask = worked_vector()
    # two processes hold this micro-batch and an identical one: DDP averages, so each rank divides by N_glob / P
    per_rank = aggregate(loss, mask, "dapo", num_items_in_batch=8.0, num_processes=2)
    assert ((per_rank + per_rank) / 2).item() == pytest.approx(0.5)


def test_bnpo_depends_on_the_micro_batch_split_unlike_dapo():
    loss, mask = worked_vector()
    split = aggregate(loss[:1], mask[:1], "bnpo", grad_accum_steps=2) + aggregate(
        loss[1:], mask[1:], "bnpo", grad_accum_steps=2
    )
    assert split.item() == pytest.approx(0.0)  # (-1/1 + 3/3) / 2
    assert aggregate(loss, mask, "bnpo").item() == pytest.approx(0.5)


def test_fully_masked_batch_gives_zero_loss_for_every_aggregation():
    loss = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.float64)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        value = aggregate(loss, mask, loss_type, max_completion_length=4)
        assert value.item() == 0.0 and math.isfinite(value.item())


def test_unknown_loss_type_is_rejected():
    loss, mask = worked_vector()
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(loss, mask, "ppo")


def test_ratio_is_clipped_asymmetrically_with_epsilon_high():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.25, 1.5]], dtype=torch.float64))
    pos = clipped_surrogate(logp, old, torch.tensor([1.0]), epsilon=0.2, epsilon_high=0.28)
    # A > 0: min(rho, clip(rho)) -> rho below 1 - eps stays rho; above 1 + eps_high is capped at 1.28
    assert torch.allclose(pos.loss, -torch.tensor([[0.5, 0.9, 1.25, 1.28]], dtype=torch.float64))
    assert pos.high_clipped.tolist() == [[False, False, False, True]] and not pos.low_clipped.any()
    neg = clipped_surrogate(logp, old, torch.tensor([-1.0]), epsilon=0.2, epsilon_high=0.28)
    # A < 0: -min(-rho, -clip(rho)) = max(rho, clip(rho)) -> rho below 0.8 is raised to 0.8
    assert torch.allclose(neg.loss, torch.tensor([[0.8, 0.9, 1.25, 1.5]], dtype=torch.float64))
    assert neg.low_clipped.tolist() == [[True, False, False, False]] and not neg.high_clipped.any()


def test_clipped_tokens_get_no_gradient():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.0, 2.0]], dtype=torch.float64)).requires_grad_()
    token = clipped_surrogate(logp, old, torch.tensor([1.0]), epsilon=0.2)
    token.loss.sum().backward()
    assert logp.grad[0, 1].item() == 0.0 and logp.grad[0, 0].item() == pytest.approx(-1.0)


def test_delta_caps_the_unclipped_ratio():
    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.log(torch.tensor([[5.0]], dtype=torch.float64))
    token = clipped_surrogate(logp, old, torch.tensor([-1.0]), delta=2.0)
    assert token.loss.item() == pytest.approx(2.0)  # max(min(5, 2), clip(5)) for A = -1


def test_k3_kl_matches_its_formula_and_is_never_negative():
    logp = torch.log(torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64))
    ref = torch.log(torch.tensor([0.25, 0.1, 0.3], dtype=torch.float64))
    kl = k3_kl(logp, ref)
    x = ref - logp
    assert torch.allclose(kl, x.exp() - x - 1)
    assert kl[1].item() == 0.0 and (kl >= 0).all()
    assert kl[0].item() == pytest.approx(0.5 - math.log(0.5) - 1)


def test_k3_kl_averages_to_the_true_kl_under_the_policy():
    # E_{x~p}[r - log r - 1] with r = q/p equals KL(p || q) because E_p[r] = 1
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    expected = (p * (p / q).log()).sum()
    assert (p * k3_kl(p.log(), q.log())).sum().item() == pytest.approx(expected.item())


def test_kl_term_is_added_with_weight_beta():
    logp = torch.log(torch.tensor([[0.5]], dtype=torch.float64))
    ref = torch.log(torch.tensor([[0.25]], dtype=torch.float64))
    plain = clipped_surrogate(logp, logp, torch.tensor([0.0]))
    with_kl = clipped_surrogate(logp, logp, torch.tensor([0.0]), ref_logp_BT=ref, beta=0.1)
    assert (with_kl.loss - plain.loss).item() == pytest.approx(0.1 * k3_kl(logp, ref).item())
    with pytest.raises(ValueError, match="reference"):
        clipped_surrogate(logp, logp, torch.tensor([0.0]), beta=0.1)


def test_group_advantages_are_centred_and_scaled_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    adv = group_advantages(rewards, group_size=4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # Bessel-corrected, as TRL
    assert torch.allclose(adv.advantages[:4], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64) / (std + 1e-4))
    assert torch.equal(adv.advantages[4:], torch.zeros(4, dtype=torch.float64))  # an all-equal group: no signal
    assert adv.zero_std.tolist() == [False, True]
    assert adv.group_mean.tolist() == [0.5, 2.0]


def test_scale_none_only_centres_and_scale_batch_uses_the_batch_std():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    none = group_advantages(rewards, 2, scale="none").advantages
    assert none.tolist() == [0.5, -0.5, 1.0, -1.0]
    batch = group_advantages(rewards, 2, scale="batch", eps=0.0).advantages
    assert torch.allclose(batch, none / rewards.std())


def test_none_rewards_are_left_out_of_group_statistics_and_get_zero_advantage():
    rewards = torch.tensor([1.0, NAN, 0.0, NAN, NAN, NAN], dtype=torch.float64)
    adv = group_advantages(rewards, group_size=3, scale="none")
    # group 1: mean over the two valid rewards only (0.5), not over three
    assert adv.advantages.tolist() == [0.5, 0.0, -0.5, 0.0, 0.0, 0.0]
    assert math.isnan(adv.group_mean[1].item())
    assert not torch.isnan(group_advantages(rewards, 3).advantages).any()


def test_a_group_with_one_valid_reward_has_no_signal():
    adv = group_advantages(torch.tensor([1.0, NAN], dtype=torch.float64), 2)
    assert adv.advantages.tolist() == [0.0, 0.0] and adv.zero_std.tolist() == [True]


def test_group_size_must_divide_the_rewards():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_combine_rewards_weights_and_skips_none():
    r = torch.tensor([[1.0, 0.5], [NAN, 1.0], [NAN, NAN]], dtype=torch.float64)
    total = combine_rewards(r, torch.tensor([2.0, 1.0]))
    assert total[:2].tolist() == [2.5, 1.0] and math.isnan(total[2].item())


def test_token_logprobs_and_entropy_match_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    ids = torch.randint(0, 5, (2, 3))
    ref = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, ids), ref)
    p = torch.softmax(logits, -1)
    assert torch.allclose(token_entropy(logits), -(p * p.log()).sum(-1))
