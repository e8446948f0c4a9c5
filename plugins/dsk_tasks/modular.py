"""Modular arithmetic ``(a op b) mod p`` (reference post_training.md §5.2, task T2).

The answer is one of ``p`` residues, so a random policy is right about ``1/p`` of the time and a GRPO group has
reward variance from the start: the smoke test that RL alone lifts accuracy. Trace:
``(23*7)%11=`` -> ``<think>23*7=161 161%11=7</think><answer>7</answer>``. Residues follow Python's ``%``
(always in ``0..p-1``, also after a subtraction: ``(3-7)%11`` is 7).
"""

from __future__ import annotations

import random
from typing import Any

from dsk.api.runtime import SYMBOLIC
from dsk_tasks.base import Problem, VerifiableTask, parse_int
from dsk_tasks.config import ModularConfig

__all__ = ["ModularTask"]


class ModularTask(VerifiableTask):
    """``(a op b) mod p`` with ``a, b`` in ``0..max_operand`` and op among ``+ - *``."""

    name = "modular"
    config_class = ModularConfig
    config: ModularConfig

    def draw(self, rng: random.Random) -> Problem:
        """Draw an operation and two operands; the key orders the operands of ``+`` and ``*`` (they commute)."""
        cfg = self.config
        op = rng.choice(cfg.ops)
        a, b = rng.randint(0, cfg.max_operand), rng.randint(0, cfg.max_operand)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        residue = value % cfg.modulus
        steps = [[a, op, b, "=", value], [value, "%", cfg.modulus, "=", residue]]
        x, y = (min(a, b), max(a, b)) if op in "+*" else (a, b)
        return Problem(
            key=f"({x}{op}{y})%{cfg.modulus}",
            steps=steps,
            answer=str(residue),
            fields={"a": a, "b": b, "op": op, "modulus": cfg.modulus},
        )

    def prompt_body(self, problem: Problem, language: str) -> str:
        """``(23*7)%11=`` (sym) or ``23 times 7 mod 11 is`` (spelled)."""
        a, b, op, p = (problem.fields[k] for k in ("a", "b", "op", "modulus"))
        if language == SYMBOLIC:
            return f"({a}{op}{b})%{p}="
        w = self.op_word
        return f"{a} {w(op, language)} {b} {w('%', language)} {p} {w('=', language)}"

    def check_answer(self, record: dict[str, Any], answer: str) -> bool:
        """The answer is the residue itself (``18`` is wrong for ``7`` mod 11: the task asks for the reduced value)."""
        value = parse_int(answer)
        return value is not None and value == int(record["answer"])
