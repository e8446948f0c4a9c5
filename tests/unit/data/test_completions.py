"""Answer and reasoning extraction from R1-style completions (shared by task checkers and rewards)."""

import pytest

from dsk.data.completions import extract_answer, extract_think


@pytest.mark.parametrize(
    "text, required, expected",
    [
        ("<think>2+4=6</think><answer> 46 </answer>", True, "46"),
        ("<answer>46</answer> trailing text", True, "46"),
        ("<answer>4\n6</answer>", True, "4\n6"),
        ("<answer></answer>", True, ""),
        ("46", True, None),
        ("46", False, "46"),
        ("<think>scratch</think> 46 ", False, "46"),
        ("<answer>45</answer><answer>46</answer>", False, None),  # hedging
        ("<answer>46", False, None),  # truncated
        ("46</answer>", False, None),
        ("<answer><answer>46</answer></answer>", True, None),
    ],
)
def test_extract_answer(text, required, expected):
    assert extract_answer(text, require_format=required) == expected


def test_extract_think():
    assert extract_think("<think>a\nb</think><answer>1</answer>") == "a\nb"
    assert extract_think("<answer>1</answer>") is None
