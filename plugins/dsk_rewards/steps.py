"""Checking the arithmetic of a chain of thought, step by step (a rule-based process reward).

The built-in tasks write their reasoning as steps ``a op b [op c] = d`` (``dsk.data.languages``): symbolic
(``7+5=12 4+8+1=13``, steps separated by spaces) or spelled out digit by digit (``seven plus five is one two,
four plus eight plus one is one three``, steps separated by ", "), possibly mixed. :func:`check_steps` reads such
a text back into steps and recomputes each, so a reward can tell a right answer reached by right steps from a lucky
one: rejection sampling on the answer alone keeps traces like ``four plus one is six ... <answer>135</answer>``,
and fine-tuning on them teaches the model that steps need not add up (measured: -6 to -18 points; see
docs/post-training.md).
"""

from __future__ import annotations

import re
from fractions import Fraction

from dsk.api.runtime import SPELLED_LANGUAGES

__all__ = ["check_steps"]

_OPS = "+-*/%"
_TOKEN_RE = re.compile(r"\d+|[-+*/%=]|[^\W\d_]+|;")


def _word_tables() -> tuple[dict[str, str], dict[str, str]]:
    """Spelled word -> digit character, and word -> operator symbol ('=' for the verbs), over every language."""
    digits: dict[str, str] = {}
    ops: dict[str, str] = {}
    for table in SPELLED_LANGUAGES.values():
        for value, word in enumerate(table.digits):
            digits[word] = str(value)
        for symbol, word in table.ops.items():
            ops[word] = symbol
    return digits, ops


_DIGIT_WORDS, _OP_WORDS = _word_tables()


def _tokens(text: str) -> list[str]:
    """Numbers, operators, '=' and ';' (step breaks); spelled digits joined into numbers; other words dropped."""
    out: list[str] = []
    spelled = ""  # digits of a spelled number being read
    for tok in _TOKEN_RE.findall(text.replace(",", " ; ").lower()):
        if tok in _DIGIT_WORDS:
            spelled += _DIGIT_WORDS[tok]
            continue
        if spelled:
            out.append(spelled)
            spelled = ""
        if tok.isdigit() or tok in _OPS or tok in ("=", ";"):
            out.append(tok)
        elif tok in _OP_WORDS:
            out.append(_OP_WORDS[tok])
        else:
            out.append(";")  # an unknown word breaks the current step
    if spelled:
        out.append(spelled)
    return out


def _apply(left: Fraction, op: str, right: Fraction) -> Fraction | None:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0:
        return None
    if op == "/":
        return left / right
    return Fraction(int(left) % int(right)) if left.denominator == right.denominator == 1 else None


def _is_number(tok: str) -> bool:
    return tok.isdigit()


def check_steps(text: str) -> tuple[int, int]:
    """``(correct, total)`` steps of ``text``; a step is ``n (op n)+ = n``, evaluated left to right.

    Each step of the built-in traces has one kind of operator, so left to right is the order they mean; ``-``
    directly before a number (after ``=`` or an operator, or at a step's start) is its sign. Fragments that are not
    a complete step count as wrong steps (a trace that stops making sense should not score).
    """
    toks = _tokens(text)
    correct = total = 0
    i, n = 0, len(toks)

    def number(j: int) -> tuple[Fraction | None, int]:
        sign = 1
        if j < n and toks[j] == "-" and j + 1 < n and _is_number(toks[j + 1]):
            sign, j = -1, j + 1
        if j < n and _is_number(toks[j]):
            return Fraction(sign * int(toks[j])), j + 1
        return None, j

    while i < n:
        if toks[i] == ";":
            i += 1
            continue
        value, j = number(i)
        if value is None:
            total += 1  # a fragment that does not start with a number
            while j < n and toks[j] != ";" and not _is_number(toks[j]):
                j += 1
            i = max(j, i + 1)
            continue
        ok = True
        ops = 0
        while j < n and toks[j] in _OPS:
            operand, k = number(j + 1)
            if operand is None:
                ok = False
                j = k
                break
            result = _apply(value, toks[j], operand) if value is not None else None
            value, j, ops = result, k, ops + 1
        if ok and ops and j < n and toks[j] == "=":
            rhs, k = number(j + 1)
            total += 1
            correct += int(rhs is not None and value is not None and value == rhs)
            i = k
            continue
        total += 1  # a step without its result
        while j < n and toks[j] != ";" and not (toks[j] == "=" or _is_number(toks[j])):
            j += 1
        i = max(j, i + 1)
    return correct, total
