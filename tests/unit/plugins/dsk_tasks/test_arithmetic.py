"""Arithmetic: exact trace forms, carries, partial products and the integer checker."""

from dsk_tasks.arithmetic import addition_steps, multiplication_steps
from dsk_tasks.base import Problem
from hypothesis import given, settings
from hypothesis import strategies as st

from dsk.data.languages import render_steps

from .helpers import make


def completion_of(a, op, b, **options):
    task = make("arithmetic", **options)
    steps = addition_steps(a, b) if op == "+" else multiplication_steps(a, b)
    problem = Problem(key="", steps=steps, answer=str(a + b if op == "+" else a * b), fields={"a": a, "b": b, "op": op})
    trace = render_steps(steps, ["sym"] * len(steps))
    return task.prompt_body(problem, "sym"), f"<think>{trace}</think><answer>{problem.answer}</answer>"


def test_addition_without_carry_matches_the_documented_example():
    assert completion_of(12, "+", 34) == ("12+34=", "<think>2+4=6 1+3=4</think><answer>46</answer>")


def test_addition_writes_carries_and_pads_the_shorter_operand():
    _, completion = completion_of(47, "+", 385)
    assert completion == "<think>7+5=12 4+8+1=13 0+3+1=4</think><answer>432</answer>"
    _, completion = completion_of(95, "+", 7)
    assert completion == "<think>5+7=12 9+0+1=10</think><answer>102</answer>"


def test_multiplication_writes_partial_products_then_their_sum():
    _, completion = completion_of(12, "*", 34)
    assert completion == "<think>12*4=48 12*30=360 48+360=408</think><answer>408</answer>"
    _, completion = completion_of(12, "*", 305)
    assert completion == "<think>12*5=60 12*300=3600 60+3600=3660</think><answer>3660</answer>"
    _, completion = completion_of(12, "*", 0)
    assert completion == "<think>12*0=0</think><answer>0</answer>"


@given(st.integers(0, 10**9), st.integers(0, 10**9))
@settings(max_examples=200, deadline=None)
def test_column_sums_spell_out_the_sum(a, b):
    steps = addition_steps(a, b)
    digits = [step[-1] % 10 for step in steps]
    carry = steps[-1][-1] // 10
    assert int(("1" if carry else "") + "".join(map(str, reversed(digits)))) == a + b


@given(st.integers(0, 10**6), st.integers(0, 10**6))
@settings(max_examples=200, deadline=None)
def test_partial_products_end_in_the_product(a, b):
    assert multiplication_steps(a, b)[-1][-1] == a * b


def test_operands_respect_the_digit_range_and_ops():
    task = make("arithmetic", min_digits=2, max_digits=3, ops=["*"])
    for record in task.records("train", 300):
        assert record["op"] == "*"
        assert all(10 <= x <= 999 for x in (record["a"], record["b"]))


def test_commuted_problems_share_a_key():
    task = make("arithmetic", ops=["+"])
    record = task.sample("train", 0)
    assert record["key"] == f"{min(record['a'], record['b'])}+{max(record['a'], record['b'])}"


def test_integer_answers_compare_by_value_but_not_loosely():
    task = make("arithmetic")
    record = {"answer": "46"}
    for good in ("46", " 46 ", "046", "+46"):
        assert task.check(record, f"<answer>{good}</answer>"), good
    for bad in ("4_6", "46.0", "4 6", "forty-six", "0x2e", "47", "-46", "4" * 5000):
        assert not task.check(record, f"<answer>{bad}</answer>"), bad


def test_spelled_prompt_and_trace():
    record = make("arithmetic", languages=["en"], min_digits=2, max_digits=2, ops=["+"]).sample("train", 0)
    a, b = record["a"], record["b"]
    assert record["prompt"] == f"{a} plus {b} is"
    assert "plus" in record["completion"] and " is " in record["completion"]
