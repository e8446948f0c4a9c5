"""Table-driven tests of the built-in rewards, including the reward-hacking strings of post_training.md §3.3."""

import pytest
from dsk_rewards.config import AccuracyConfig, FormatConfig, LanguageConsistencyConfig, OverlongConfig
from dsk_rewards.rewards import accuracy, format_reward, language_consistency, overlong

from dsk.testing import builtin_registry


def arithmetic_record(a=47, b=385):
    return {"task": "arithmetic", "answer": str(a + b), "a": a, "b": b, "op": "+"}


def call(fn, config, completions, records=(), **scalars):
    records = list(records) or [{}] * len(completions)
    columns = {k: [r.get(k) for r in records] for k in {k for r in records for k in r}}
    return fn(config, ["p"] * len(completions), list(completions), **columns, **scalars)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>7+5=12</think><answer>432</answer>", 1.0),
        ("<think>x</think><answer> 432 </answer>", 1.0),
        ("<answer>0432</answer>", 1.0),  # the task's checker accepts leading zeros
        ("<think>7+5=12</think><answer>431</answer>", 0.0),
        ("432", 0.0),  # no answer tag
        ("<answer></answer>", 0.0),  # empty answer matches nothing (Visual-RFT #176)
        ("<answer>432</answer><answer>431</answer>", 0.0),  # hedging with several answers
        ("<answer>432", 0.0),  # truncated
    ],
)
def test_accuracy_asks_the_task_checker(completion, expected):
    registry = builtin_registry()  # the run's registry: the reward builds the record's task from it
    assert call(accuracy, AccuracyConfig(), [completion], [arithmetic_record()], registry=registry) == [expected]


def test_accuracy_uses_the_checker_the_trainer_passes():
    seen = []

    def checker(record, text):
        seen.append((record["answer"], text))
        return text == "yes"

    out = call(accuracy, AccuracyConfig(correct=2.0, wrong=-1.0), ["yes", "no"], [{"answer": "1"}] * 2, checker=checker)
    assert out == [2.0, -1.0] and seen == [("1", "yes"), ("1", "no")]


def test_accuracy_is_none_without_a_reference_answer():
    out = call(
        accuracy, AccuracyConfig(), ["<answer>1</answer>", "<answer>1</answer>"], [{"answer": None}, {"answer": "1"}]
    )
    assert out == [None, 1.0]


def test_accuracy_without_task_column_compares_the_answer_text():
    out = call(accuracy, AccuracyConfig(), ["<answer>ab</answer>", "<answer>a</answer>"], [{"answer": "ab"}] * 2)
    assert out == [1.0, 0.0]


def test_accuracy_treats_a_raising_checker_as_not_applicable():
    def checker(record, text):
        raise RuntimeError("boom")

    assert call(accuracy, AccuracyConfig(), ["x"], [{"answer": "1"}], checker=checker) == [None]


def test_accuracy_countdown_record_through_the_registry():
    record = {"task": "countdown", "answer": "3*5+7", "numbers": [3, 5, 7], "target": 22}
    completions = ["<answer>7+5*3</answer>", "<answer>3*5*7</answer>"]
    out = call(accuracy, AccuracyConfig(), completions, [record] * 2, registry=builtin_registry())
    assert out == [1.0, 0.0]
    # without the run's registry the task cannot be built: the answer text is compared
    assert call(accuracy, AccuracyConfig(), completions, [record] * 2) == [0.0, 0.0]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>7+5=12</think><answer>12</answer>", 1.0),
        ("<think>a</think>\n<answer>b</answer>\n", 1.0),
        ("<think></think><answer>12</answer>", 0.0),  # empty think (Soup #814)
        ("<think>a</think><answer></answer>", 0.0),
        ("<answer>12</answer>", 0.0),
        ("<think>a</think><answer>1</answer></answer>", 0.0),  # repeated closing tag (TinyZero PR #112)
        ("<think>a</think><answer>1</answer>extra", 0.0),
        ("<answer>1</answer><think>a</think>", 0.0),
        ("<think>a<answer>1</answer></think>", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward_requires_exactly_think_then_answer(completion, expected):
    assert call(format_reward, FormatConfig(), [completion]) == [expected]


def test_format_partial_credit_and_optional_think():
    wrong_order = "<answer>1</answer><think>a</think>"
    assert call(format_reward, FormatConfig(partial=0.25), [wrong_order]) == [0.25]
    loose = FormatConfig(require_think=False)
    assert call(format_reward, loose, ["<answer>1</answer>", "<think>a</think><answer>1</answer>", "1"]) == [1, 1, 0]
    assert call(format_reward, FormatConfig(allow_empty=True), ["<think></think><answer>1</answer>"]) == [1.0]


@pytest.mark.parametrize(
    ("language", "completion", "expected"),
    [
        ("en", "<think>seven plus five is one two</think><answer>12</answer>", 1.0),
        ("de", "<think>sieben plus fünf ist eins zwei</think><answer>12</answer>", 1.0),
        ("en", "<think>seven plus five ist eins zwei</think><answer>12</answer>", 3 / 6),  # mixed: seven plus five
        ("sym", "<think>7+5=12</think><answer>12</answer>", 1.0),
        ("sym", "<think>7+5=12 seven</think><answer>12</answer>", 0.5),
        ("en", "<answer>12</answer>", None),  # no chain of thought to judge
        (None, "<think>seven</think><answer>7</answer>", None),  # no target language
    ],
)
def test_language_consistency_is_the_share_of_target_language_words(language, completion, expected):
    out = call(language_consistency, LanguageConsistencyConfig(), [completion], [{"language": language}])
    assert out == [pytest.approx(expected) if expected is not None else None]


def test_language_consistency_can_score_the_whole_completion():
    config = LanguageConsistencyConfig(scope="completion")
    assert call(language_consistency, config, ["seven plus five"], [{"language": "en"}]) == [1.0]


@pytest.mark.parametrize(("length", "expected"), [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (17, -1.0)])
def test_overlong_is_dapo_soft_punishment(length, expected):
    config = OverlongConfig(max_length=16, buffer=4)
    assert call(overlong, config, ["x"], completion_ids=[[1] * length]) == [pytest.approx(expected)]


def test_overlong_takes_the_trainers_limit_and_counts_characters_without_ids():
    config = OverlongConfig(buffer=2)
    assert call(overlong, config, ["abc", "abcd"], max_completion_length=4) == [-0.5, -1.0]
    with pytest.raises(ValueError, match="max_length"):
        call(overlong, config, ["abc"])


def test_overlong_config_rejects_a_buffer_longer_than_the_limit():
    with pytest.raises(ValueError, match="buffer"):
        OverlongConfig(max_length=4, buffer=8)
