"""Countdown: reach a target from a few numbers with ``+ - * /`` (reference post_training.md §5.2, task T5).

``3,5,7>22`` -> ``<think>3*5=15 15+7=22</think><answer>3*5+7</answer>``. Targets are reachable by construction:
the generator combines a random subset of the numbers with random operations, keeping every intermediate result a
positive integer (the Countdown rules), and the trace is that construction. Any correct expression passes the
checker, not only the reference one: it parses the answer with :mod:`dsk_tasks.expr` (no ``eval``), requires each
given number to be used at most once (a multiset check, so a number given twice may be used twice) and compares
the exact rational value with the target.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from dsk.api.runtime import SPELLED_LANGUAGES, SYMBOLIC, Step
from dsk_tasks.base import Problem, VerifiableTask
from dsk_tasks.config import CountdownConfig
from dsk_tasks.expr import ExpressionError, evaluate

__all__ = ["CountdownTask", "check_countdown"]

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3
_MAX_ATTEMPTS = 1000


def _combine(left: tuple[str, int], op: str, right: tuple[str, int]) -> tuple[str, int]:
    """Join two (expression, precedence) pairs with the fewest parentheses that keep the value."""
    prec = _PRECEDENCE[op]
    (lt, lp), (rt, rp) = left, right
    if lp < prec:
        lt = f"({lt})"
    # The right side also needs parentheses at equal precedence after - and /: a-(b-c) != a-b-c.
    if rp < prec or (rp == prec and op in "-/"):
        rt = f"({rt})"
    return f"{lt}{op}{rt}", prec


def check_countdown(numbers: list[int], target: int, answer: str) -> bool:
    """Whether ``answer`` is an expression over ``numbers`` (each at most once) whose value is ``target``."""
    try:
        value, used = evaluate(answer)
    except ExpressionError:
        return False
    if Counter(used) - Counter(numbers):  # some number used more often than given (or never given)
        return False
    return value == target


class CountdownTask(VerifiableTask):
    """Numbers in ``1..max_number``, ``min_numbers..max_numbers`` of them, a target in ``1..max_target``."""

    name = "countdown"
    config_class = CountdownConfig
    config: CountdownConfig

    def _solve_randomly(self, rng: random.Random, numbers: list[int]) -> tuple[int, str, list[Step]] | None:
        """Combine a random subset of ``numbers`` into (target, expression, steps), or None on a dead end."""
        cfg = self.config
        k = len(numbers)
        chosen = rng.sample(range(k), k if cfg.use_all else rng.randint(2, k))
        pool = [(numbers[i], (str(numbers[i]), _ATOM)) for i in chosen]
        steps: list[Step] = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (x, xe), (y, ye) = pool[i], pool[j]
            options = []
            for op in cfg.ops:
                a, ae, b, be = (x, xe, y, ye) if x >= y or op in "+*" else (y, ye, x, xe)
                if op == "-" and a == b:
                    continue  # results must stay positive
                if op == "/" and (b == 1 or a % b):
                    continue  # exact division only; dividing by 1 is a wasted step
                options.append((a, ae, op, b, be))
            if not options:
                return None
            a, ae, op, b, be = rng.choice(options)
            value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
            steps.append([a, op, b, "=", value])
            pool = [p for n, p in enumerate(pool) if n not in (i, j)] + [(value, _combine(ae, op, be))]
        target, (expression, _) = pool[0]
        if not 1 <= target <= cfg.max_target:
            return None
        return target, expression, steps

    def draw(self, rng: random.Random) -> Problem:
        """Draw numbers and a reachable target; the key is the sorted numbers and the target (order is no clue)."""
        cfg = self.config
        for _ in range(_MAX_ATTEMPTS):
            k = rng.randint(cfg.min_numbers, cfg.max_numbers)
            numbers = [rng.randint(1, cfg.max_number) for _ in range(k)]
            solved = self._solve_randomly(rng, numbers)
            if solved is not None:
                target, expression, steps = solved
                key = ",".join(map(str, sorted(numbers))) + f">{target}"
                return Problem(key=key, steps=steps, answer=expression, fields={"numbers": numbers, "target": target})
        raise ValueError(
            f"countdown: no reachable target in 1..{cfg.max_target} after {_MAX_ATTEMPTS} tries with ops={cfg.ops} "
            f"and numbers up to {cfg.max_number}; widen max_target or allow more ops"
        )

    def prompt_body(self, problem: Problem, language: str) -> str:
        """``3,5,7>22`` (sym) or ``3,5,7 make 22`` (spelled)."""
        numbers = ",".join(map(str, problem.fields["numbers"]))
        target = problem.fields["target"]
        if language == SYMBOLIC:
            return f"{numbers}>{target}"
        return f"{numbers} {SPELLED_LANGUAGES[language].goal} {target}"

    def check_answer(self, record: dict[str, Any], answer: str) -> bool:
        """Any expression over the record's numbers (each at most once) equal to its target."""
        return check_countdown(list(record["numbers"]), int(record["target"]), answer)
