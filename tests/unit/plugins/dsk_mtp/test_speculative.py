"""Speculative decoding with the MTP heads: identical to greedy decoding, sane acceptance accounting."""

import pytest
import torch
from dsk_mtp.speculative import speculative_generate

from dsk.model.generate import generate
from dsk.model.loss import training_loss
from tests.unit.model.tiny import tiny_model

PROMPTS = [[3, 7, 1, 9, 4], [5], [8, 8, 6, 1, 2, 2, 2]]


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_output_equals_greedy_token_for_token(depth):
    model = tiny_model(seed=depth)
    for prompt in PROMPTS:
        greedy = generate(model, [prompt], 20, temperature=0).tokens[0]
        spec = speculative_generate(model, prompt, 20, depth=depth)
        assert spec.tokens == greedy
        assert 0.0 <= spec.acceptance_rate <= 1.0
        assert spec.accepted <= spec.drafted
        assert len(spec.tokens) == 1 + spec.verify_steps + spec.accepted  # prefill + (1 + accepted) per verify


def test_speculative_stops_at_eos_like_greedy():
    model = tiny_model()
    greedy = generate(model, [PROMPTS[0]], 20, temperature=0).tokens[0]
    eos = greedy[5]
    spec = speculative_generate(model, PROMPTS[0], 20, eos_id=eos)
    assert spec.finished and spec.tokens == greedy[: greedy.index(eos) + 1]


def test_heads_trained_on_a_cycle_draft_tokens_the_model_accepts():
    # A few AdamW steps on a repeating 7-token cycle teach both the model and the MTP heads the sequence; the
    # drafts are then right and get accepted, and the output is still exactly greedy decoding's.
    model = tiny_model(dtype=torch.float32).train()
    seq = torch.tensor([5, 11, 2, 30, 7, 19, 41]).repeat(10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        ids = torch.stack([seq[s : s + 24] for s in torch.randint(0, 7, (4,), generator=g).tolist()])
        loss = training_loss(model, ids, ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    spec = speculative_generate(model, [5, 11, 2], 30, depth=2)
    assert spec.tokens == generate(model, [[5, 11, 2]], 30, temperature=0).tokens[0]
    assert spec.tokens[:7] == [30, 7, 19, 41, 5, 11, 2]
    assert spec.acceptance_rate > 0.8
    assert spec.tokens_per_step > 2.0  # up to depth + 1 = 3 tokens per main-model forward


def test_speculative_needs_mtp_heads():
    with pytest.raises(ValueError, match="no MTP heads"):
        speculative_generate(tiny_model(mtp=None), [1, 2], 4)


def test_speculative_respects_max_seq_len():
    model = tiny_model()  # max_seq_len 64
    spec = speculative_generate(model, [1] * 58, 20)
    assert len(spec.tokens) == 6
    assert spec.tokens == generate(model, [[1] * 58], 20, temperature=0).tokens[0]
    assert torch.is_grad_enabled()


def test_the_mtp_heads_offer_the_drafter_the_core_loop_finds_by_name():
    from dsk.api.generation import BatchDrafter, BatchDrafterProvider
    from dsk.model.generate import find_drafter
    from dsk.model.generate import speculative_generate as core_speculative_generate

    model = tiny_model(seed=2)
    assert isinstance(model.mtp, BatchDrafterProvider) and find_drafter(model, "mtp") is model.mtp
    assert isinstance(model.mtp.make_batch_drafter(model, 3, 16), BatchDrafter)
    for prompt in PROMPTS:
        by_name = core_speculative_generate(model, prompt, 12, drafter="mtp", max_drafts=2)
        assert by_name == speculative_generate(model, prompt, 12, depth=2)


def _trained_on_cycle(cycle: list[int], seed: int = 0):
    """The tiny model (float64) after 25 AdamW steps on a repeating cycle: its MTP heads draft what it accepts."""
    model = tiny_model(seed=seed).train()
    seq = torch.tensor(cycle).repeat(10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        ids = torch.stack([seq[s : s + 24] for s in torch.randint(0, len(cycle), (4,), generator=g).tolist()])
        loss = training_loss(model, ids, ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


BATCH = [[3, 7, 1, 9, 4], [5], [8, 8, 6, 1, 2, 2, 2], [11, 2], [30, 7, 19], [41, 5, 11, 2, 30, 7, 19, 41, 5]]


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("trained", [False, True])
def test_batched_speculative_output_equals_batched_greedy_row_for_row(depth, trained):
    # rows of different lengths; an EOS that some rows produce early and others never; heads that draft well
    # (trained on the cycle) and heads that draft badly (random): every row is greedy decoding's, token for token
    model = _trained_on_cycle([5, 11, 2, 30, 7, 19, 41]) if trained else tiny_model(seed=depth)
    budget = 6 if trained else 18  # the cycle reaches every token within 7: some rows must run out first
    eos = generate(model, BATCH, budget, temperature=0).tokens[1][4]
    plain = generate(model, BATCH, budget, temperature=0, eos_id=eos, return_logprobs=True)
    assert any(plain.finished) and not all(plain.finished)
    spec = speculative_generate(model, BATCH, budget, eos, depth=depth, return_logprobs=True)
    assert spec.tokens == plain.tokens
    assert spec.finished == plain.finished and spec.truncated == plain.truncated
    for b, prompt in enumerate(BATCH):  # the batch of one is the one-prompt call
        alone = speculative_generate(model, prompt, budget, eos, depth=depth)
        assert alone.tokens == plain.tokens[b]
    ref = plain.logprobs
    torch.testing.assert_close(torch.tensor(sum(spec.logprobs, [])), torch.tensor(sum(ref, [])))
    assert all(0 <= a <= d for a, d in zip(spec.accepted, spec.drafted, strict=True))
    if trained:
        assert spec.acceptance_rate > 0.8
