"""A safe evaluator for countdown answers: integers, ``+ - * /`` and parentheses, in exact rational arithmetic.

No ``eval``: TinyZero's checker calls ``eval`` with empty builtins, which still lets a completion run
``().__class__...`` tricks or ``9**9**9``. This parser accepts only the grammar below, bounds the text length and
the nesting depth, and computes with ``fractions.Fraction`` so ``6/4*2`` is exactly 3 (no float tolerance needed).

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := NUMBER | "(" expr ")"

There is no unary minus: every number in a countdown answer must be one of the given numbers.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["ExpressionError", "evaluate"]

MAX_CHARS = 200
MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 6
_TOKEN_RE = re.compile(r"\s*(?:(\d+)|([-+*/()]))")


class ExpressionError(ValueError):
    """The text is not a well-formed expression of the countdown grammar (or divides by zero)."""


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise ExpressionError(f"unexpected character {text[pos:].lstrip()[:1]!r} at position {pos}")
        number, symbol = match.groups()
        if number is not None and len(number) > MAX_NUMBER_DIGITS:
            raise ExpressionError(f"number {number[:10]}… has more than {MAX_NUMBER_DIGITS} digits")
        tokens.append(number if number is not None else symbol)
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("expression ends too early")
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        token = self.take()
        if token == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            return value
        if token.isdigit():
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise ExpressionError(f"expected a number or '(', got {token!r}")


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """Value of an expression and the numbers it uses, in order of appearance.

    Raises:
        ExpressionError: text too long, a character outside digits/``+-*/()``/spaces, bad syntax, a number with
            too many digits, nesting too deep, or division by zero.
    """
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"expression longer than {MAX_CHARS} characters")
    tokens = _tokenize(text)
    if not tokens:
        raise ExpressionError("empty expression")
    parser = _Parser(tokens)
    value = parser.expr(0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after the expression")
    return value, parser.numbers
