"""Countdown: reachable targets, a checker that accepts any valid expression and refuses hacks."""

import pytest
from dsk_tasks.countdown import check_countdown
from dsk_tasks.expr import evaluate
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import make


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("3*5+7", True),
        ("7+5*3", True),  # any expression reaching the target, not only the reference
        (" ( 3 * 5 ) + 7 ", True),
        ("(7+15)", False),  # 15 is not given
        ("3*5+7+0", False),  # 0 is not given
        ("3*5+7*1", False),
        ("3*3+7+6", False),
        ("3*5+7-3+3", False),  # 3 used twice, given once
        ("3*5", False),  # right numbers, wrong value
        ("22", False),
        ("-3*-5+7", False),  # no unary minus
        ("3*5+7=22", False),
        ("__import__('os').system('x')", False),
        ("3**5", False),
        ("", False),
        ("(" * 40 + "3" + ")" * 40, False),
        ("3/0+7", False),
    ],
)
def test_checker_table(answer, ok):
    assert check_countdown([3, 5, 7], 22, answer) is ok


def test_numbers_given_twice_may_be_used_twice():
    assert check_countdown([4, 4, 2], 18, "4*4+2")
    assert not check_countdown([4, 2, 1], 18, "4*4+2")


def test_division_is_exact_rational():
    assert check_countdown([6, 4, 2], 3, "6/4*2")
    assert not check_countdown([7, 2, 1], 3, "7/2")


def test_generated_problems_follow_the_countdown_rules():
    task = make("countdown", min_numbers=3, max_numbers=4, max_number=20, max_target=100)
    for record in task.records("train", 500):
        numbers, target = record["numbers"], record["target"]
        assert 3 <= len(numbers) <= 4 and all(1 <= n <= 20 for n in numbers)
        assert 1 <= target <= 100
        value, used = evaluate(record["answer"])
        assert value == target and len(used) >= 2
        for step in record["completion"].split("<think>")[1].split("</think>")[0].split():
            assert int(step.split("=")[1]) > 0  # every intermediate result is a positive integer


def test_use_all_makes_the_reference_use_every_number():
    task = make("countdown", use_all=True)
    for record in task.records("train", 200):
        assert sorted(evaluate(record["answer"])[1]) == sorted(record["numbers"])


def test_ops_restrict_the_reference_solution():
    task = make("countdown", ops=["+"])
    for record in task.records("train", 100):
        assert set(record["answer"]) <= set("0123456789+")


def test_impossible_settings_fail_with_a_message():
    task = make("countdown", ops=["+"], min_numbers=2, max_numbers=2, max_number=999, max_target=2)
    with pytest.raises(ValueError, match="no reachable target"):
        task.sample("train", 0)


def test_order_of_numbers_does_not_make_a_new_problem():
    task = make("countdown")
    record = task.sample("train", 0)
    assert record["key"] == ",".join(map(str, sorted(record["numbers"]))) + f">{record['target']}"


@given(st.text(alphabet="0123456789+-*/() ", max_size=40))
@settings(max_examples=300, deadline=None)
def test_checker_never_raises_on_expression_like_text(text):
    assert check_countdown([3, 5, 7, 12], 22, text) in (True, False)
