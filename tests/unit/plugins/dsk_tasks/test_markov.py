"""The markov task: a seeded synthetic language whose entropy rate is known exactly."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from dsk_tasks.config import MarkovConfig
from dsk_tasks.markov import MarkovTask
from pydantic import ValidationError


def make(**kw) -> MarkovTask:
    return MarkovTask(MarkovConfig(**kw))


def test_train_and_test_splits_never_share_a_text():
    task = make(vocab=4, order=1, length=6)  # 4^6 = 4096 texts: repeats happen, and must stay on their side
    train = {task.sample("train", i)["text"] for i in range(3000)}
    test = {task.sample("test", i)["text"] for i in range(500)}
    assert len(train) > 500 and len(test) > 50
    assert not train & test
    assert all(task.split_of(t) == "test" for t in test)
    # split membership is a function of the text alone: another seed's test set is still disjoint from train
    other = {r["text"] for r in make(vocab=4, order=1, length=6, seed=3).records("test", 100)}
    assert not train & other


def test_records_are_deterministic_from_the_seeds():
    a, b = make(seed=5), make(seed=5)
    assert [a.sample("train", i) for i in range(20)] == [b.sample("train", i) for i in range(20)]
    assert a.records("train", 30)[29] == b.sample("train", 29)
    assert [r["text"] for r in make(seed=6).records("train", 5)] != [r["text"] for r in a.records("train", 5)]
    # the language (the chain) depends on language_seed only: another sample seed, the same entropy
    assert make(seed=6).entropy_rate == a.entropy_rate
    assert make(language_seed=1).entropy_rate != a.entropy_rate


def test_records_are_texts_of_the_alphabet_with_the_configured_length():
    task = make(vocab=5, length=12)
    for r in task.records("train", 20):
        assert len(r["text"]) == 12 and set(r["text"]) <= set("abcde") and r["split"] == "train"
        assert "prompt" not in r  # a pre-training document, not a problem to generate an answer for


def test_stationary_distribution_is_a_fixed_point():
    task = make(vocab=4, order=2)
    pi, V, n = task.stationary, 4, 16
    assert sum(pi) == pytest.approx(1.0, abs=1e-12)
    nxt = [0.0] * n
    for s in range(n):
        for y in range(V):
            nxt[(s * V) % n + y] += pi[s] * task.transitions[s][y]
    assert max(abs(a - b) for a, b in zip(nxt, pi, strict=True)) < 1e-12


@pytest.mark.parametrize("order", [1, 2])
def test_empirical_entropy_of_long_samples_matches_the_analytic_rate(order):
    task = make(vocab=6, order=order, length=4000, concentration=0.7)
    texts = [task.sample("train", i)["text"] for i in range(10)]
    # the true model's mean negative log-likelihood per symbol tends to the entropy rate (ergodic theorem);
    # 40k symbols leave a standard error of about 0.5%
    k = order
    nll = -sum(task.log_prob(t) - task.log_prob(t[:k]) for t in texts) / sum(len(t) - k for t in texts)
    assert nll == pytest.approx(task.entropy_rate, rel=0.02)
    # and the plug-in estimate from counts, which knows nothing of the chain: H(next | last k) from frequencies
    ctx, joint = Counter(), Counter()
    for t in texts:
        for i in range(k, len(t)):
            ctx[t[i - k : i]] += 1
            joint[t[i - k : i + 1]] += 1
    total = sum(joint.values())
    plug_in = -sum(c / total * math.log(c / ctx[key[:-1]]) for key, c in joint.items())
    assert plug_in == pytest.approx(task.entropy_rate, rel=0.03)


def test_uniform_limit_has_entropy_ln_vocab():
    task = make(vocab=8, order=1, concentration=100.0)
    assert task.entropy_rate == pytest.approx(math.log(8), rel=0.01)
    assert task.entropy_rate < math.log(8)


def test_loss_floor_counts_the_first_symbols_and_a_free_eos():
    task = make(vocab=8, order=2, length=10)
    expected = (task.initial_entropy + 8 * task.entropy_rate) / 11
    assert task.loss_floor == pytest.approx(expected)
    assert task.metadata()["loss_floor"] == task.loss_floor
    assert task.initial_entropy <= 2 * math.log(8)


def test_bad_options_are_config_errors():
    with pytest.raises(ValidationError, match="length"):
        MarkovConfig(length=3)  # at least 4, so longer than any order
    with pytest.raises(ValidationError, match="order"):
        MarkovConfig(order=4)


def test_bad_split_and_index_raise():
    task = make()
    with pytest.raises(ValueError, match="split="):
        task.sample("dev", 0)
    with pytest.raises(ValueError, match="index="):
        task.sample("train", -1)
