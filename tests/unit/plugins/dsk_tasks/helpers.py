"""Helpers shared by the dsk_tasks tests: the tasks under test and an independent checker of symbolic traces."""

import re

from dsk_tasks.arithmetic import ArithmeticTask
from dsk_tasks.config import ArithmeticConfig, CountdownConfig, ModularConfig
from dsk_tasks.countdown import CountdownTask
from dsk_tasks.modular import ModularTask

TASKS = {
    "arithmetic": (ArithmeticTask, ArithmeticConfig),
    "countdown": (CountdownTask, CountdownConfig),
    "modular": (ModularTask, ModularConfig),
}


def make(name, **options):
    """Build a task directly (no registry) with ``options`` on its config."""
    task_class, config_class = TASKS[name]
    return task_class(config_class(**options))


_STEP_RE = re.compile(r"^(-?\d+)((?:[-+*/%]\d+)+)=(-?\d+)$")


def symbolic_steps_are_correct(trace):
    """Recompute every ``left=right`` step of a symbolic trace here, left to right (each step has one kind of
    operator, so left to right is the right order)."""
    for step in trace.split(" "):
        match = _STEP_RE.match(step)
        assert match, f"malformed step {step!r}"
        first, rest, right = match.groups()
        value = int(first)
        for op, n in re.findall(r"([-+*/%])(\d+)", rest):
            n = int(n)
            if op == "+":
                value += n
            elif op == "-":
                value -= n
            elif op == "*":
                value *= n
            elif op == "%":
                value %= n
            else:
                assert value % n == 0, f"inexact division in {step!r}"
                value //= n
        if int(right) != value:
            return False
    return True


def think_of(completion):
    """The trace between the think tags."""
    return completion.split("<think>", 1)[1].split("</think>", 1)[0]
