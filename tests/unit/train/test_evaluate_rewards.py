"""``evaluate_task`` scores rewards on the greedy completions and, with ``pass_k``, reports the same means over the
k sampled completions of every record (the samples pass@k uses).

Checked against an independent computation: the completions :func:`dsk.model.generate.generate` gives for each
record alone (greedy, and k samples from the record's own generator), the reward functions called directly on
them, and the means taken by hand.
"""

from __future__ import annotations

import pytest
import torch

from dsk.api import ResolvedSlot
from dsk.data.tokenizers import CharTokenizer
from dsk.model.generate import generate
from dsk.train.evaluate import _record_generator, evaluate_task, pass_at_k, score_rewards
from tests.unit.model.tiny import VOCAB, tiny_model

BUDGET = 8
K = 3
SEED = 5
RECORDS = [{"prompt": p, "w": w} for p, w in (("ab", 0.5), ("c+d=", 2.0), ("7", -1.0), ("xyz?", 0.0), ("q-1", 3.0))]


class _OddLength:
    """A task whose checker passes completions of odd length (any rule will do: the counts are compared)."""

    @staticmethod
    def check(record, text):
        return len(text) % 2 == 1


def digit_share(config, prompts, completions, **columns):
    """The share of digits in a completion (a spread even for a random tiny model)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def odd_only(config, prompts, completions, **columns):
    """None for an even-length completion: a reward that applies to some completions only."""
    return [len(text) / 10 if len(text) % 2 else None for text in completions]


def columns_read(config, prompts, completions, *, w, completion_ids, truncated, max_completion_length, **columns):
    """Reads a record column, the ids, the truncation flags and the budget: they reach the reward per completion."""
    return [
        wi * config["scale"] + len(ids) / max_completion_length + float(t)
        for wi, ids, t in zip(w, completion_ids, truncated, strict=True)
    ]


def never(config, prompts, completions, **columns):
    return [None] * len(completions)


def _slot(name, fn, config=None):
    return ResolvedSlot(kind="reward", name=name, config=config if config is not None else {}, impl=fn)


REWARDS = {
    "digits": _slot("digits", digit_share),
    "odd": _slot("odd", odd_only),
    "columns": _slot("columns", columns_read, {"scale": 0.25}),
    "never": _slot("never", never),
}


@pytest.fixture(scope="module")
def setup():
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789+-=?")  # 48 ids: the tiny model's vocabulary
    assert tokenizer.vocab_size == VOCAB
    model = tiny_model(mtp=None)
    with torch.no_grad():  # make EOS likely, so that completions differ in length
        hidden = model(torch.tensor([list(range(9, 16))])).hidden[0].mean(0)
        model.lm_head.weight[tokenizer.eos_id] = hidden / hidden.norm()
    return model, tokenizer


def _by_hand(model, tokenizer, k: int):
    """Greedy and sampled completions of each record alone, the rewards called directly, the means by hand."""
    out: dict[str, float | None] = {}
    greedy, sampled = [], []
    for i, record in enumerate(RECORDS):
        prompt = [tokenizer.bos_id, *tokenizer.encode(record["prompt"])]
        kw = {"eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
        g = generate(model, [prompt], BUDGET, temperature=0.0, **kw)
        greedy.append((record, g.tokens[0], g.truncated[0]))
        if k:
            gen = _record_generator(torch.device("cpu"), SEED, i)
            s = generate(model, [prompt] * k, BUDGET, temperature=1.0, generator=[gen], **kw)
            sampled += [(record, t, tr) for t, tr in zip(s.tokens, s.truncated, strict=True)]

    def means(rows, prefix):
        texts = [tokenizer.decode(t) for _, t, _ in rows]
        prompts = [r["prompt"] for r, _, _ in rows]
        out[f"eval/{prefix}accuracy"] = sum(_OddLength.check(None, t) for t in texts) / len(rows)
        for name, slot in REWARDS.items():
            cols = {"w": [r["w"] for r, _, _ in rows]}
            if name == "columns":
                cols |= {"completion_ids": [t for _, t, _ in rows], "truncated": [tr for _, _, tr in rows]}
                cols["max_completion_length"] = BUDGET
            values = [v for v in slot.impl(slot.config, prompts, texts, **cols) if v is not None]
            out[f"eval/{prefix}{name}"] = sum(values) / len(values) if values else None
        return texts

    texts = means(greedy, "")
    out["eval/new_tokens_mean"] = sum(len(t) for _, t, _ in greedy) / len(greedy)
    out["eval/truncated"] = sum(tr for _, _, tr in greedy) / len(greedy)
    if k:
        stexts = means(sampled, "sampled_")
        hits = [sum(_OddLength.check(None, t) for t in stexts[i * k : (i + 1) * k]) for i in range(len(RECORDS))]
        out[f"eval/pass@{k}"] = sum(pass_at_k(h, k, k) for h in hits) / len(RECORDS)
    return out, texts


def test_rewards_are_scored_on_the_greedy_and_on_the_k_sampled_completions(setup):
    model, tokenizer = setup
    result = evaluate_task(
        model, tokenizer, _OddLength(), RECORDS, max_new_tokens=BUDGET, batch_size=4, pass_k=K, temperature=1.0,
        seed=SEED, rewards=REWARDS,
    )  # fmt: skip
    expected, _ = _by_hand(model, tokenizer, K)
    for key, value in expected.items():
        if value is None:
            assert result[key] is None, key
        else:
            assert result[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert set(expected) | {"eval/samples", "eval/seconds"} == set(result)
    assert result["eval/never"] is None and result["eval/sampled_never"] is None  # applies to no completion
    assert 0 < result["eval/sampled_odd"] and 0 < result["eval/sampled_digits"]  # the samples are scored
    assert result["eval/sampled_columns"] != result["eval/columns"]
    assert result["eval/new_tokens_mean"] < BUDGET  # some rows stopped at EOS


def test_without_pass_k_there_are_no_sampled_keys_and_the_greedy_figures_are_the_same(setup):
    model, tokenizer = setup
    kwargs = {"max_new_tokens": BUDGET, "batch_size": 4, "temperature": 1.0, "seed": SEED, "rewards": REWARDS}
    greedy = evaluate_task(model, tokenizer, _OddLength(), RECORDS, pass_k=0, **kwargs)
    both = evaluate_task(model, tokenizer, _OddLength(), RECORDS, pass_k=K, **kwargs)
    assert not any("sampled" in key or "pass@" in key for key in greedy)
    expected, _ = _by_hand(model, tokenizer, 0)
    for key in expected:
        assert greedy[key] == both[key], key


def test_a_reward_named_like_a_result_key_leaves_the_checkers_accuracy(setup):
    model, tokenizer = setup
    calls = []

    def accuracy(config, prompts, completions, **columns):
        calls.append(len(completions))
        return [0.5] * len(completions)

    result = evaluate_task(
        model, tokenizer, _OddLength(), RECORDS, max_new_tokens=BUDGET, pass_k=2, seed=SEED,
        rewards={"accuracy": _slot("accuracy", accuracy)},
    )  # fmt: skip
    expected, _ = _by_hand(model, tokenizer, 0)
    assert result["eval/accuracy"] == expected["eval/accuracy"] and calls == []


def test_score_rewards_names_a_reward_that_breaks_the_contract():
    def short(config, prompts, completions, **columns):
        return [1.0]

    def boolean(config, prompts, completions, **columns):
        return [True] * len(completions)

    records = [{"prompt": "a"}, {"prompt": "b"}]
    with pytest.raises(ValueError, match="reward 'short' returned 1 values for 2 completions"):
        score_rewards({"short": _slot("short", short)}, records, ["x", "y"])
    with pytest.raises(ValueError, match="reward 'flag' returned True"):
        score_rewards({"flag": _slot("flag", boolean)}, records, ["x", "y"])
