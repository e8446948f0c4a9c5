"""Speculative sampling keeps the sampling distribution exact: the accept/reject step by enumeration, and the whole
loop (MTP heads drafting) against plain sampling's token distribution."""

from __future__ import annotations

import pytest
import torch

from dsk.model.generate import generate, speculative_accept, speculative_generate
from tests.unit.model.tiny import VOCAB, tiny_model

# Exact rationals on a grid: thresholds min(1, p/q) are 1, 1/3, 1 and 1/2, the residual norm(max(0, p - q)) is
# (2/3, 0, 1/3, 0), p1 has sixths, and a certain draft x leaves p without x over 1 - p(x) (halves, sevenths,
# quarters): N = 168 midpoint uniforms per draw hit every mass exactly.
P0 = [0.5, 0.125, 0.25, 0.125]
Q1 = [0.25, 0.375, 0.125, 0.25]
P1 = [1 / 6, 1 / 3, 1 / 2, 0.0]
N = 168


def _grid_outcomes(draft: int, certain: bool):
    """Run the accept/reject step on every pair of grid uniforms (accept test, final draw) for one draft token:
    -> (accepted [N*N], next token [N*N])."""
    u = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    u_test, u_draw = torch.meshgrid(u, u, indexing="ij")
    rows = N * N
    p = torch.tensor([P0, P1], dtype=torch.float64).expand(rows, 2, 4)
    q = None if certain else torch.tensor([Q1], dtype=torch.float64).expand(rows, 1, 4)
    drafts = torch.full((rows, 1), draft, dtype=torch.long)
    return speculative_accept(p, q, drafts, torch.stack([u_test.reshape(-1), u_draw.reshape(-1)], dim=1))


@pytest.mark.parametrize("certain", [False, True])
def test_the_accept_reject_step_commits_each_token_with_exactly_the_target_probability(certain):
    # Enumerate the draft token (weighted by q, or each certain draft on its own) and both uniforms on the grid:
    # the first committed token has distribution P0 exactly, and after an accepted draft the bonus token has P1.
    drafts = [(x, Q1[x]) for x in range(4)] if not certain else [(x, 1.0) for x in range(4)]
    for group in [drafts] if not certain else [[d] for d in drafts]:
        first = torch.zeros(4, dtype=torch.float64)
        bonus = torch.zeros(4, dtype=torch.float64)
        accepted_mass = 0.0
        for x, weight in group:
            a, nxt = _grid_outcomes(x, certain)
            token0 = torch.where(a == 1, torch.full_like(nxt, x), nxt)
            first += weight * torch.bincount(token0, minlength=4).double() / (N * N)
            bonus += weight * torch.bincount(nxt[a == 1], minlength=4).double() / (N * N)
            accepted_mass += weight * float((a == 1).double().mean())
        torch.testing.assert_close(first, torch.tensor(P0, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(bonus, accepted_mass * torch.tensor(P1, dtype=torch.float64), rtol=0, atol=1e-12)
        # the acceptance probability itself: sum_x q(x) min(1, p(x)/q(x)) = sum_x min(p, q)
        expected = sum(min(P0[x], Q1[x]) for x in range(4)) if not certain else P0[group[0][0]]
        assert accepted_mass == pytest.approx(expected, abs=1e-12)


def test_equal_target_and_draft_distributions_accept_every_draft():
    p = torch.tensor([[P0, P1]], dtype=torch.float64)
    u = torch.tensor([[0.999, 0.5]], dtype=torch.float64)
    a, nxt = speculative_accept(p, p[:, :1], torch.tensor([[3]]), u)
    assert a.tolist() == [1] and nxt.tolist() == [2]  # the bonus token: inverse CDF of P1 at 0.5


def _exact_marginals(model, prompt: list[int], temperature: float, top_p: float) -> list[torch.Tensor]:
    """The plain sampling distribution of generated tokens 1, 2 and 3 after ``prompt``, by enumerating the
    tokens before them (one batched forward per depth: V, then V*V continuations)."""
    from dsk.model.generate import _sampling_probs

    def next_probs(seqs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _sampling_probs(model(seqs).logits[:, -1], temperature, top_p)  # (N, V)

    base = torch.tensor([prompt])
    p1 = next_probs(base)[0]  # (V,)
    seqs2 = torch.cat([base.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], dim=1)  # (V, P+1)
    p2_given = next_probs(seqs2)  # (V, V): row t1
    marginal2 = p1 @ p2_given
    last = torch.arange(VOCAB).repeat(VOCAB)[:, None]
    seqs3 = torch.cat([seqs2.repeat_interleave(VOCAB, dim=0), last], dim=1)  # (V*V, P+2): (t1, t2)
    weight = (p1[:, None] * p2_given).reshape(-1)  # P(t1, t2)
    marginal3 = weight @ next_probs(seqs3)
    return [p1, marginal2, marginal3]


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness of fit of ``counts`` [V] to ``probs`` [V], cells with fewer than 5 expected pooled."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_draws_the_tokens_plain_sampling_draws(temperature, top_p):
    # The tiny model with two MTP depths, its head scaled up so that the target p and the drafts' q are peaked and
    # different: the mean acceptance, sum_x min(p, q) = 1 - TV(p, q), then lies well below 1, so a wrong accept
    # rule would move the output distribution by about that much. 4000 rows of one prompt: tokens 2 and 3 of
    # each come from verified rounds; each position's histogram must fit plain sampling's exact marginal.
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    prompt, rows = [3, 7, 1], 4000
    exact = _exact_marginals(model, prompt, temperature, top_p)
    gen = torch.Generator().manual_seed(0)
    spec = speculative_generate(model, [prompt] * rows, 3, drafter="mtp", temperature=temperature, top_p=top_p,
                                generator=gen)  # fmt: skip
    assert 0.2 < spec.acceptance_rate < 0.9, spec.acceptance_rate
    assert all(len(t) == 3 for t in spec.tokens)
    plain = generate(model, [prompt] * rows, 3, temperature=temperature, top_p=top_p, generator=gen)
    drawn = torch.tensor(spec.tokens)  # (rows, 3)
    for i in range(3):
        counts = torch.bincount(drawn[:, i], minlength=VOCAB).double()
        assert _chi_square_p_value(counts, exact[i]) > 1e-3, f"token {i + 1}"
        # plain sampling against the same marginals: the enumeration is what plain sampling draws
        plain_counts = torch.bincount(torch.tensor(plain.tokens)[:, i], minlength=VOCAB).double()
        assert _chi_square_p_value(plain_counts, exact[i]) > 1e-3, f"plain token {i + 1}"
        # and the two histograms are close in total variation (sampling noise at 4000 rows is ~0.05 here)
        assert 0.5 * float((counts - plain_counts).abs().sum()) / rows < 0.08


def test_speculative_sampling_is_reproducible_with_a_generator_per_block_of_rows():
    model = tiny_model(seed=1)
    prompts = [[3, 7, 1], [5], [8, 8, 6, 1], [2, 9]]

    def run():
        gens = [torch.Generator().manual_seed(s) for s in (11, 12)]  # two blocks of two rows
        return speculative_generate(model, prompts, 6, drafter="mtp", temperature=0.9, generator=gens)

    first, again = run(), run()
    assert first.tokens == again.tokens and all(len(t) == 6 for t in first.tokens)
    with pytest.raises(ValueError, match="do not split 4 prompts"):
        speculative_generate(model, prompts, 6, drafter="mtp", temperature=0.9, generator=[torch.Generator()] * 3)
