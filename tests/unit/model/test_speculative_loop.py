"""The core's speculative loop through the drafter protocol, with drafters written here (no MTP heads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsk.api import Drafter, DrafterProvider
from dsk.model.generate import drafter_names, find_drafter, generate, speculative_generate
from tests.unit.model.tiny import VOCAB, tiny_model

PROMPTS = [[3, 7, 1, 9, 4], [5], [8, 8, 6, 1, 2, 2, 2]]


class RecomputingDrafter:
    """Proposes the model's own greedy continuation (recomputed without a cache), or that plus ``shift`` mod V.

    It also checks the protocol's promise: one hidden row per committed token except the last, equal to a fresh
    forward's final-norm hidden states.
    """

    def __init__(self, model: nn.Module, shift: int):
        self.model, self.shift = model, shift
        self.seq: list[int] = []
        self.hidden: list[torch.Tensor] = []

    def observe(self, tokens: list[int], hidden: torch.Tensor) -> None:
        self.seq += tokens
        self.hidden += list(hidden)
        assert len(self.hidden) == len(self.seq) - 1

    def propose(self, limit: int) -> list[int]:
        assert limit >= 1
        seq = list(self.seq)
        out = self.model(torch.tensor([seq[:-1]]))
        torch.testing.assert_close(torch.stack(self.hidden), out.hidden[0], rtol=1e-9, atol=1e-11)
        for _ in range(limit):
            seq.append(int(self.model(torch.tensor([seq])).logits[0, -1].argmax()))
        return [(t + self.shift) % VOCAB for t in seq[len(self.seq) :]]


class Oracle(nn.Module):
    """A component offering the drafter ``oracle`` (a DrafterProvider), as a plugin component would."""

    drafter_name = "oracle"

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift

    def make_drafter(self, model: nn.Module, max_len: int) -> Drafter:
        return RecomputingDrafter(model, self.shift)


def test_test_drafter_meets_the_protocols():
    model = tiny_model(mtp=None)
    assert isinstance(Oracle(), DrafterProvider)
    assert isinstance(Oracle().make_drafter(model, 8), Drafter)


@pytest.mark.parametrize("max_drafts", [1, 3, 5])
def test_drafts_equal_to_greedy_are_all_accepted_and_the_output_is_greedy(max_drafts):
    model = tiny_model(mtp=None)
    for prompt in PROMPTS:
        greedy = generate(model, [prompt], 16, temperature=0).tokens[0]
        spec = speculative_generate(model, prompt, 16, drafter=Oracle(), max_drafts=max_drafts)
        assert spec.tokens == greedy
        assert spec.accepted == spec.drafted > 0
        assert len(spec.tokens) == 1 + spec.verify_steps + spec.accepted
        # every round but the last (which only has the budget left) drafts max_drafts tokens
        assert spec.verify_steps == -(-(16 - 1) // (max_drafts + 1))


def test_wrong_drafts_are_all_rejected_and_the_output_is_still_greedy():
    model = tiny_model(mtp=None)
    greedy = generate(model, [PROMPTS[0]], 10, temperature=0).tokens[0]
    spec = speculative_generate(model, PROMPTS[0], 10, drafter=Oracle(shift=1), max_drafts=2)
    assert spec.tokens == greedy
    assert spec.accepted == 0 and spec.drafted > 0 and spec.verify_steps == 9


def test_the_loop_finds_a_component_drafter_by_name_and_stops_at_eos():
    model = tiny_model(mtp=None)
    model.add_module("oracle", Oracle())  # any module of the model may offer a drafter
    assert drafter_names(model) == ["oracle"] and find_drafter(model, "oracle") is model.oracle
    greedy = generate(model, [PROMPTS[0]], 12, temperature=0).tokens[0]
    eos = greedy[6]
    spec = speculative_generate(model, PROMPTS[0], 12, eos_id=eos, drafter="oracle", max_drafts=4)
    assert spec.finished and spec.tokens == greedy[: greedy.index(eos) + 1]


def test_an_unknown_drafter_name_is_a_value_error_listing_those_offered():
    model = tiny_model(mtp=None)
    model.add_module("oracle", Oracle())
    with pytest.raises(ValueError, match=r"'medusa' \(offered: oracle\)"):
        speculative_generate(model, [1, 2], 4, drafter="medusa")
    with pytest.raises(ValueError, match="offered: none"):
        find_drafter(tiny_model(mtp=None), "oracle")


def test_a_one_sequence_drafter_runs_once_per_row_of_a_batch_and_the_output_is_greedy():
    # the older, one-sequence Drafter form: the loop makes one per row; rows of different lengths, one stopping at
    # an EOS, right drafts (shift 0) and wrong ones (shift 1)
    model = tiny_model(mtp=None)
    eos = generate(model, [PROMPTS[1]], 12, temperature=0).tokens[0][3]
    plain = generate(model, PROMPTS, 12, temperature=0, eos_id=eos)
    assert plain.finished[1]
    for shift in (0, 1):
        spec = speculative_generate(model, PROMPTS, 12, eos_id=eos, drafter=Oracle(shift), max_drafts=3)
        assert spec.tokens == plain.tokens and spec.finished == plain.finished
        assert (spec.acceptance_rate == 1.0) if shift == 0 else (sum(spec.accepted) == 0)
