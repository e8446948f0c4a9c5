"""Trace selection for rejection sampling and distillation: only accepted, no duplicates, provenance on every row."""

import math

import pytest
import torch
from dsk_rewards.config import AccuracyConfig, FormatConfig
from dsk_rewards.rewards import accuracy, format_reward
from dsk_rl import traces as traces_module
from dsk_rl.config import RejectionSamplingConfig
from dsk_rl.rollout import Samples, pack, score
from dsk_rl.traces import generate_traces, select

from dsk.api import ResolvedSlot
from dsk.testing import builtin_registry


def test_select_keeps_accepted_eos_terminated_unique_completions():
    totals = [1.0, 1.0, 0.0, 1.0, 2.0, float("nan")]
    texts = ["a", "a", "b", "c", "d", "e"]
    truncated = [False, False, False, True, False, False]
    kept, counts = select(totals, texts, truncated, 3, threshold=1.0)
    assert kept == [0, 4]  # 1 duplicates 0, 2 below threshold, 3 truncated, 5 has no applicable reward (counts 0)
    assert counts == {"accepted": 3, "truncated": 1, "duplicates": 1}


def test_select_best_of_n_and_cap_per_prompt():
    totals = [1.0, 3.0, 3.0, 2.0]
    texts = ["a", "b", "c", "d"]
    kept, _ = select(totals, texts, [False] * 4, 4, threshold=0.0, keep="best")
    assert kept == [1]  # highest reward, earliest sample on a tie
    kept, _ = select(totals, texts, [False] * 4, 4, threshold=0.0, max_per_prompt=2)
    assert kept == [0, 1]
    kept, _ = select(totals, ["a", "a", "a", "a"], [False] * 4, 4, threshold=0.0, dedupe=False)
    assert kept == [0, 1, 2, 3]


def slot(fn, config, name):
    return ResolvedSlot(kind="reward", name=name, config=config, impl=fn)


def test_score_builds_the_reward_matrix_with_nan_for_none():
    records = [{"prompt": "p", "answer": "1"}, {"prompt": "q", "answer": None}]
    rewards = {"accuracy": slot(accuracy, AccuracyConfig(), "accuracy"),
               "format": slot(format_reward, FormatConfig(weight=0.5), "format")}  # fmt: skip
    texts = ["<think>x</think><answer>1</answer>", "<answer>1</answer>"]
    scores = score(rewards, ["p", "q"], texts, records)
    assert scores.values[0].tolist() == [1.0, 1.0] and math.isnan(scores.values[1, 0].item())
    assert scores.total.tolist() == [1.5, 0.0]
    assert scores.row(1) == {"accuracy": None, "format": 0.0}


def test_score_rejects_a_reward_that_returns_the_wrong_length():
    rewards = {"bad": slot(lambda config, prompts, completions, **kw: [1.0], AccuracyConfig(), "bad")}
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        score(rewards, ["p", "q"], ["a", "b"], [{}, {}])


def test_pack_aligns_each_completion_token_with_the_logit_that_predicts_it():
    packed = pack([[1, 2, 3], [1, 4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 5, 6], [1, 4, 7, 8, 9]]
    assert packed.targets.tolist() == [[5, 6, 0], [7, 8, 9]]
    assert packed.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    # the logit at position p predicts the token at p + 1
    rows = torch.arange(2)[:, None]
    assert torch.equal(packed.input_ids[rows, (packed.logit_index + 1).clamp(max=4)][packed.mask.bool()],
                       packed.targets[packed.mask.bool()])  # fmt: skip


def test_generated_traces_hold_only_accepted_unique_completions_with_provenance(monkeypatch, dsk_registry):
    from dsk.data.tokenizers import CharTokenizer

    tok = CharTokenizer()
    outputs = ["<answer>3</answer>", "<answer>3</answer>", "<answer>4</answer>", "<answer>3</answer>"]
    truncated = [False, False, False, True]

    def fake_sample(model, tokenizer, prompt_ids, n, **kwargs):
        repeated = [list(p) for p in prompt_ids for _ in range(n)]
        texts = [outputs[i % n] for i in range(len(repeated))]
        ids = [tok.encode(t) for t in texts]
        return Samples(repeated, ids, [truncated[i % n] for i in range(len(repeated))], texts)

    monkeypatch.setattr(traces_module, "sample", fake_sample)
    cfg = builtin_registry().validate(RejectionSamplingConfig, dict(samples_per_prompt=4, rewards={"accuracy": {}}))
    records = [
        {"prompt": "1+2=", "answer": "3", "split": "train", "index": 0, "completion": "<answer>3</answer>"},
        {"prompt": "2+2=", "answer": "4", "split": "train", "index": 5, "completion": "<answer>4</answer>"},
    ]
    rows, stats = generate_traces(None, tok, records, cfg, checker=None, generator=None, source="ckpt/step-9",
                                  origin="rejection_sampling")  # fmt: skip
    assert [(r["prompt_id"], r["sample_index"], r["completion"]) for r in rows] == [
        ("train/0", 0, "<answer>3</answer>"),
        ("train/5", 2, "<answer>4</answer>"),
    ]
    for row in rows:
        assert row["rewards"] == {"accuracy": 1.0} and row["reward"] == 1.0
        assert row["source"] == "ckpt/step-9" and row["origin"] == "rejection_sampling"
    assert (stats.sampled, stats.accepted, stats.duplicates, stats.truncated, stats.kept) == (8, 3, 1, 2, 2)
    assert stats.row()["traces/prompt_coverage"] == 1.0
