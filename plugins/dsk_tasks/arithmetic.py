"""Multi-digit addition and multiplication with a scratchpad (reference post_training.md §5.2, tasks T3/T4).

Traces, in the compact symbolic form:

- addition, column by column from the units, carry as a third term when there is one:
  ``47+385=`` -> ``<think>7+5=12 4+8+1=13 0+3+1=4</think><answer>432</answer>``;
- multiplication, one partial product per non-zero digit of the right operand, then their running sum:
  ``12*34=`` -> ``<think>12*4=48 12*30=360 48+360=408</think><answer>408</answer>``.

Carry decisions are where small models fail ("critical tokens", Vassoyan et al. 2025), so the trace writes each
column sum in full instead of only its last digit.
"""

from __future__ import annotations

import random
from typing import Any

from dsk.api.runtime import SYMBOLIC, Step
from dsk_tasks.base import Problem, VerifiableTask, parse_int
from dsk_tasks.config import ArithmeticConfig

__all__ = ["ArithmeticTask", "addition_steps", "multiplication_steps"]


def addition_steps(a: int, b: int) -> list[Step]:
    """Column sums from the units up: ``[da, "+", db, ("+", carry), "=", sum]`` per column."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps: list[Step] = []
    carry = 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append([x, "+", y, *(["+", carry] if carry else []), "=", total])
        carry = total // 10
    return steps


def multiplication_steps(a: int, b: int) -> list[Step]:
    """Partial products ``a * (digit * 10**i)`` for the non-zero digits of ``b``, then their running sum."""
    partials: list[int] = []
    steps: list[Step] = []
    for i, d in enumerate(str(b)[::-1]):
        if d != "0":
            m = int(d) * 10**i
            partials.append(a * m)
            steps.append([a, "*", m, "=", a * m])
    if not partials:  # b == 0
        return [[a, "*", 0, "=", 0]]
    total = partials[0]
    for p in partials[1:]:
        steps.append([total, "+", p, "=", total + p])
        total += p
    return steps


class ArithmeticTask(VerifiableTask):
    """``a+b`` and ``a*b`` with operands of ``min_digits..max_digits`` digits; the answer is the integer result."""

    name = "arithmetic"
    config_class = ArithmeticConfig
    config: ArithmeticConfig

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.config.min_digits, self.config.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def draw(self, rng: random.Random) -> Problem:
        """Draw an operation and two operands; ``3+4`` and ``4+3`` share one key (same split)."""
        op = rng.choice(self.config.ops)
        a, b = self._operand(rng), self._operand(rng)
        if op == "+":
            result, steps = a + b, addition_steps(a, b)
        else:
            result, steps = a * b, multiplication_steps(a, b)
        key = f"{min(a, b)}{op}{max(a, b)}"  # both operations commute
        return Problem(key=key, steps=steps, answer=str(result), fields={"a": a, "b": b, "op": op})

    def prompt_body(self, problem: Problem, language: str) -> str:
        """``12+34=`` (sym) or ``12 plus 34 is`` (spelled)."""
        a, b, op = problem.fields["a"], problem.fields["b"], problem.fields["op"]
        if language == SYMBOLIC:
            return f"{a}{op}{b}="
        return f"{a} {self.op_word(op, language)} {b} {self.op_word('=', language)}"

    def check_answer(self, record: dict[str, Any], answer: str) -> bool:
        """The answer is an integer equal to the reference (leading zeros and a ``+`` sign allowed)."""
        value = parse_int(answer)
        return value is not None and value == int(record["answer"])
