"""The task interface, for every built-in task: disjoint splits, determinism, correct traces, robust checking."""

import json

import pytest
from dsk_tasks.base import R1_TEMPLATE
from hypothesis import given, settings
from hypothesis import strategies as st

from dsk.data.languages import language_consistency

from .helpers import TASKS, make, symbolic_steps_are_correct, think_of

NAMES = sorted(TASKS)
N_TRAIN = 3000
N_TEST = 600


def wrong_completion(name, record):
    """A well-formed completion with a wrong answer."""
    if name == "countdown":
        # the sum of all numbers is a valid expression, wrong unless it happens to hit the target
        numbers = record["numbers"]
        wrong = "+".join(map(str, numbers)) if sum(numbers) != record["target"] else str(record["target"] + 1)
        return f"<answer>{wrong}</answer>"
    return f"<answer>{int(record['answer']) + 1}</answer>"


@pytest.mark.parametrize("name", NAMES)
def test_train_and_test_splits_never_share_a_problem(name):
    task = make(name)
    train = {task.sample("train", i)["key"] for i in range(N_TRAIN)}
    test = {task.sample("test", i)["key"] for i in range(N_TEST)}
    assert len(test) > 50 and len(train) > 200
    assert not train & test
    assert all(task.split_of(k) == "train" for k in train) and all(task.split_of(k) == "test" for k in test)


@pytest.mark.parametrize("name", NAMES)
def test_split_membership_does_not_depend_on_the_seed(name):
    # Otherwise a model trained with seed 0 could meet its training problems in the seed-1 test set.
    train_seed0 = {make(name, seed=0).sample("train", i)["key"] for i in range(1500)}
    test_seed1 = {r["key"] for r in make(name, seed=1).records("test")}
    assert not train_seed0 & test_seed1


@pytest.mark.parametrize("name", NAMES)
def test_records_are_deterministic_from_seed_split_and_index(name):
    a, b = make(name, seed=5), make(name, seed=5)
    assert [a.sample("train", i) for i in range(50)] == [b.sample("train", i) for i in range(50)]
    assert a.sample("test", 17) == b.sample("test", 17)
    # any index can be asked for directly, without generating the ones before it
    assert a.records("train", 40)[39] == b.sample("train", 39)


@pytest.mark.parametrize("name", NAMES)
def test_different_seeds_give_different_records(name):
    a = [r["key"] for r in make(name, seed=0).records("train", 50)]
    b = [r["key"] for r in make(name, seed=1).records("train", 50)]
    assert a != b
    assert len(set(a) ^ set(b)) > 20


@pytest.mark.parametrize("name", NAMES)
def test_test_set_has_test_size_distinct_problems(name):
    test = make(name, test_size=40).records("test")
    assert len(test) == 40 and len({r["key"] for r in test}) == 40
    assert all(r["split"] == "test" for r in test)


@pytest.mark.parametrize("name", NAMES)
def test_records_hold_the_documented_fields_and_are_json(name):
    record = make(name).sample("train", 0)
    assert {"prompt", "answer", "completion", "language", "mixed", "key", "split", "index", "task"} <= record.keys()
    assert json.loads(json.dumps(record)) == record
    assert record["completion"].startswith("<think>") and record["completion"].endswith("</answer>")


@pytest.mark.parametrize("name", NAMES)
def test_reference_completions_pass_the_checker_and_their_steps_are_right(name):
    task = make(name)
    for i in range(1500):
        record = task.sample("train", i)
        assert task.check(record, record["completion"]), record
        assert symbolic_steps_are_correct(think_of(record["completion"])), record


@pytest.mark.parametrize("name", NAMES)
def test_wrong_answers_are_rejected(name):
    task = make(name)
    for i in range(300):
        record = task.sample("train", i)
        assert not task.check(record, wrong_completion(name, record)), record


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "template",
    [
        "",
        "{answer}",  # no answer tag while the format is required
        "<answer>{answer}",  # truncated
        "{answer}</answer>",
        "<answer></answer>",
        "<answer>{answer}</answer><answer>{answer}</answer>",  # repeated answers
        "<answer>{wrong}</answer><answer>{answer}</answer>",  # hedging
        "<answer><answer>{answer}</answer></answer>",
        "<think>{answer}</think>",
        "<answer>{answer} {answer}</answer>",
    ],
)
def test_malformed_completions_are_rejected(name, template):
    task = make(name)
    record = task.sample("train", 3)
    wrong = wrong_completion(name, record)[len("<answer>") : -len("</answer>")]
    assert not task.check(record, template.format(answer=record["answer"], wrong=wrong))


@pytest.mark.parametrize("name", NAMES)
def test_answer_tags_are_optional_when_format_is_not_required(name):
    task = make(name, require_format=False)
    record = task.sample("train", 1)
    assert task.check(record, f"  {record['answer']}\n")
    assert task.check(record, f"<think>scratch</think>{record['answer']}")
    assert task.check(record, record["completion"])
    assert not make(name).check(record, record["answer"])


@pytest.mark.parametrize("name", NAMES)
@given(text=st.text(max_size=80))
@settings(max_examples=150, deadline=None)
def test_checker_never_raises(name, text):
    task = make(name)
    record = task.sample("train", 0)
    assert task.check(record, text) in (True, False)
    assert task.check(record, f"<answer>{text}</answer>") in (True, False)


@pytest.mark.parametrize("name", NAMES)
def test_trace_false_gives_the_answer_only(name):
    task = make(name, trace=False)
    record = task.sample("train", 2)
    assert record["completion"] == f"<answer>{record['answer']}</answer>"
    assert task.check(record, record["completion"])


@pytest.mark.parametrize("name", NAMES)
def test_bare_format_writes_no_tags_and_checks_the_whole_text(name):
    task = make(name, trace=False, format="bare")
    record = task.sample("train", 2)
    assert record["completion"] == record["answer"]
    assert task.check(record, record["completion"])


@pytest.mark.parametrize("name", NAMES)
def test_r1_format_wraps_the_short_prompt_in_the_r1_zero_template(name):
    short = make(name).sample("train", 4)
    r1 = make(name, format="r1").sample("train", 4)
    assert r1["prompt"] == R1_TEMPLATE.format(prompt=short["prompt"])
    assert r1["completion"] == short["completion"]


@pytest.mark.parametrize("name", NAMES)
def test_language_mixing_rate_is_roughly_as_configured(name):
    task = make(name, languages=["en", "fr", "sym"], language_mix_rate=0.3)
    records = task.records("train", 1500)
    rate = sum(r["mixed"] for r in records) / len(records)
    assert abs(rate - 0.3) < 0.05
    languages = [r["language"] for r in records]
    assert all(abs(languages.count(lang) / len(records) - 1 / 3) < 0.05 for lang in ("en", "fr", "sym"))


@pytest.mark.parametrize("name", NAMES)
def test_unmixed_traces_are_in_their_language_and_mixed_ones_are_not(name):
    task = make(name, languages=["en", "fr"], language_mix_rate=0.5)
    for record in task.records("train", 400):
        score = language_consistency(think_of(record["completion"]), record["language"])
        if record["mixed"]:
            assert score < 1.0, record
        else:
            assert score == 1.0, record


@pytest.mark.parametrize("name", NAMES)
def test_no_mixing_without_a_mix_rate(name):
    records = make(name, languages=["en", "fr"]).records("train", 300)
    assert not any(r["mixed"] for r in records)


@pytest.mark.parametrize("name", NAMES)
def test_mix_rate_changes_only_the_mixing(name):
    plain = make(name, languages=["en", "de"]).records("train", 50)
    mixed = make(name, languages=["en", "de"], language_mix_rate=0.5).records("train", 50)
    assert [r["key"] for r in plain] == [r["key"] for r in mixed]
    assert [r["language"] for r in plain] == [r["language"] for r in mixed]


@pytest.mark.parametrize("name", NAMES)
def test_prompt_follows_the_target_language_or_a_fixed_one(name):
    task = make(name, languages=["en", "fr"])
    verbs = {"en": " is", "fr": " égale"} if name != "countdown" else {"en": " make ", "fr": " faire "}
    for record in task.records("train", 40):
        assert verbs[record["language"]] in record["prompt"]
    fixed = make(name, languages=["en", "fr"], prompt_language="sym").records("train", 40)
    assert not any(" " in r["prompt"] for r in fixed)


@pytest.mark.parametrize("name", NAMES)
def test_spelled_traces_still_check(name):
    task = make(name, languages=["en", "fr", "de", "es"], language_mix_rate=0.5)
    for record in task.records("train", 200):
        assert task.check(record, record["completion"])


def test_bad_split_and_index_are_rejected():
    task = make("modular")
    with pytest.raises(ValueError, match="'dev'"):
        task.sample("dev", 0)
    with pytest.raises(ValueError, match="index=-1"):
        task.sample("train", -1)
    with pytest.raises(ValueError, match="needs n"):
        task.records("train")


def test_a_test_set_larger_than_the_split_is_an_error():
    task = make("modular", modulus=3, max_operand=3, test_size=50)
    with pytest.raises(ValueError, match="distinct test problems"):
        task.records("test")


def test_task_refuses_a_config_of_another_task():
    from dsk_tasks.arithmetic import ArithmeticTask
    from dsk_tasks.config import ModularConfig

    with pytest.raises(TypeError, match="ArithmeticConfig"):
        ArithmeticTask(ModularConfig())
