"""The safe expression evaluator behind the countdown checker."""

from fractions import Fraction

import pytest
from dsk_tasks.expr import MAX_CHARS, ExpressionError, evaluate


@pytest.mark.parametrize(
    "text, value",
    [
        ("1+2*3", 7),
        ("(1+2)*3", 9),
        ("8-3-2", 3),
        ("8-(3-2)", 7),
        ("8/4/2", 1),
        ("8/(4/2)", 4),
        ("1/3*3", 1),
        (" 12 ", 12),
    ],
)
def test_precedence_and_associativity(text, value):
    assert evaluate(text)[0] == value


def test_numbers_are_reported_in_order():
    assert evaluate("(3+14)*2-1") == (Fraction(33), [3, 14, 2, 1])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("1+", "ends too early"),
        ("1 2", "unexpected '2'"),
        ("(1+2", "ends too early"),
        ("1+2)", r"unexpected '\)'"),
        ("1/0", "division by zero"),
        ("1/(2-2)", "division by zero"),
        ("2**3", "expected a number"),
        ("1.5", "unexpected character '.'"),
        ("a+1", "unexpected character 'a'"),
        ("1234567+1", "more than 6 digits"),
        ("(" * 40 + "1" + ")" * 40, "nested deeper"),
        ("1+" * MAX_CHARS + "1", "longer than"),
    ],
)
def test_errors(text, message):
    with pytest.raises(ExpressionError, match=message):
        evaluate(text)
