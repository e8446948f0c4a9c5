"""The shared machinery of the built-in verifiable tasks: seeding, disjoint splits, rendering and checking.

A task subclasses :class:`VerifiableTask` and implements three methods:

- ``draw(rng) -> Problem``: one random problem with its canonical key, reasoning steps and answer;
- ``prompt_body(problem, language) -> str``: the short prompt (``"12+34="``);
- ``check_answer(record, answer) -> bool``: is an extracted answer right for this record.

Everything else (splits, languages, formats, answer extraction) lives here, so the three tasks behave alike. The
language tables (``dsk.data.languages``) and the answer extraction (``dsk.data.completions``) are in the core, because
reward functions use them too.
"""

from __future__ import annotations

import abc
import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from dsk.api.runtime import SPELLED_LANGUAGES, SYMBOLIC, Step, extract_answer, render_steps
from dsk_tasks.config import TaskConfig

__all__ = [
    "R1_TEMPLATE",
    "Problem",
    "VerifiableTask",
    "parse_int",
    "stable_hash",
]

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

# The DeepSeek-R1-Zero prompt template (R1 report, Table 1); {prompt} is the task's short prompt.
R1_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)

# Rejection sampling draws until a problem of the requested split comes up; with test_percent >= 1 the expected
# number of draws is at most 100, so hitting this bound means the problem space holds no problem of that split.
_MAX_DRAWS = 20_000


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's ``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Problem:
    """One generated problem before rendering.

    Attributes:
        key: canonical form; equal keys mean the same problem (e.g. ``3+4`` and ``4+3``), and the split of a
            problem is decided by the hash of its key alone.
        steps: the reasoning steps (see :mod:`dsk.data.languages`).
        answer: the reference answer text.
        fields: task-specific record columns (operands, numbers, target...).
    """

    key: str
    steps: list[Step]
    answer: str
    fields: dict[str, Any] = field(default_factory=dict)


class VerifiableTask(abc.ABC):
    """Base of the built-in tasks: ``Task(config)``; see docs/tasks.md for the interface."""

    name: ClassVar[str] = "task"
    config_class: ClassVar[type[TaskConfig]] = TaskConfig

    def __init__(self, config: TaskConfig | None = None):
        self.config = self.config_class() if config is None else config
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")

    # ---- implemented by each task ------------------------------------------------------------------------------

    @abc.abstractmethod
    def draw(self, rng: random.Random) -> Problem:
        """One random problem (any split); ``sample`` keeps drawing until the split matches."""

    @abc.abstractmethod
    def prompt_body(self, problem: Problem, language: str) -> str:
        """The short prompt of ``problem`` with its words in ``language``."""

    @abc.abstractmethod
    def check_answer(self, record: dict[str, Any], answer: str) -> bool:
        """Whether an extracted answer is right for ``record``; must not raise on any string."""

    # ---- shared ------------------------------------------------------------------------------------------------

    def split_of(self, key: str) -> Split:
        """The split a problem belongs to, from the hash of its canonical key.

        The seed is not part of the hash: a test problem is a test problem for every seed, so a model trained with
        any seed has never seen any seed's test set.
        """
        return "test" if stable_hash(f"{self.name}|{key}") % 100 < self.config.test_percent else "train"

    def _rng(self, split: str, index: int) -> random.Random:
        return random.Random(stable_hash(f"{self.name}|{self.config.seed}|{split}|{index}"))

    def sample(self, split: Split, index: int) -> dict[str, Any]:
        """The record at ``index`` of ``split``; the same (config, split, index) always gives the same record.

        Raises:
            ValueError: unknown split, negative index, or a problem space with no problem in this split.
        """
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: must be 'train' or 'test'")
        if index < 0:
            raise ValueError(f"index={index}: must be >= 0")
        rng = self._rng(split, index)
        for _ in range(_MAX_DRAWS):
            problem = self.draw(rng)
            if self.split_of(problem.key) == split:
                break
        else:
            raise ValueError(
                f"{self.name}: no {split} problem in {_MAX_DRAWS} draws; the problem space is too small for "
                f"test_percent={self.config.test_percent}"
            )
        return self._render(problem, rng, split, index)

    def _render(self, problem: Problem, rng: random.Random, split: str, index: int) -> dict[str, Any]:
        cfg = self.config
        # Every random choice is drawn whatever the options, so changing one option (say the mix rate) changes
        # only what that option controls and leaves the rest of each record as it was.
        language = rng.choice(cfg.languages)
        mixed = rng.random() < cfg.language_mix_rate
        switch = [rng.random() < 0.5 for _ in problem.steps]
        forced = rng.randrange(len(problem.steps)) if problem.steps else 0
        others = [lang for lang in cfg.languages if lang != language]
        step_languages = [language] * len(problem.steps)
        if mixed and others and problem.steps:
            if not any(switch):
                switch[forced] = True  # a mixed trace must actually mix
            step_languages = [rng.choice(others) if s else language for s in switch]

        prompt_language = language if cfg.prompt_language == "target" else cfg.prompt_language
        prompt = self.prompt_body(problem, prompt_language)
        if cfg.format == "r1":
            prompt = R1_TEMPLATE.format(prompt=prompt)
        if cfg.format == "bare":
            completion = problem.answer
        else:
            think = f"<think>{render_steps(problem.steps, step_languages)}</think>" if cfg.trace else ""
            completion = f"{think}<answer>{problem.answer}</answer>"
        return {
            "task": self.name,
            "split": split,
            "index": index,
            "key": problem.key,
            "prompt": prompt,
            "completion": completion,
            "answer": problem.answer,
            "language": language,
            "mixed": mixed and bool(others) and bool(problem.steps),
            **problem.fields,
        }

    def records(self, split: Split, n: int | None = None, *, unique: bool | None = None) -> list[dict[str, Any]]:
        """``n`` records of ``split``.

        Args:
            split: ``"train"`` or ``"test"``.
            n: how many; defaults to ``config.test_size`` for the test split (required for train).
            unique: skip records whose problem already appeared (by canonical key). Defaults to True for the test
                split (a test set of distinct problems) and False for train, where records are
                ``sample(split, 0..n-1)`` exactly.

        Raises:
            ValueError: ``n`` missing for train, or fewer than ``n`` distinct problems found in the split.
        """
        return take_records(
            self.name, self.sample, split, n, self.config.test_size, unique,
            hint="lower test_size or widen the problem space (digits, numbers, operands)", noun="problems",
        )  # fmt: skip

    def extract_answer(self, text: str) -> str | None:
        """The answer in a completion (see :func:`extract_answer`), honouring ``config.require_format``."""
        return extract_answer(text, require_format=self.config.answer_tag_required)

    def check(self, record: dict[str, Any], completion_text: str) -> bool:
        """Whether ``completion_text`` answers ``record`` correctly; False for malformed text, never raises."""
        answer = self.extract_answer(completion_text)
        if answer is None:
            return False
        return self.check_answer(record, answer)

    @property
    def eval_rewards(self) -> dict[str, dict[str, Any]]:
        """The rewards ``dsk eval`` scores this task's completions with by default: ``{name: options}`` (reward
        tables whose ``type`` defaults to the name, as ``[trainer.rewards.<name>]``).

        A completion of these tasks has a layout and, when it reasons, a language: the format reward (with
        ``require_think`` only when the task writes a trace) and the language consistency of the trace. ``bare``
        completions are the answer alone: nothing to score but accuracy.
        """
        if self.config.format == "bare":
            return {}
        if not self.config.trace:
            return {"format": {"require_think": False}}
        return {"format": {}, "language_consistency": {}}

    def op_word(self, op: str, language: str) -> str:
        """The symbol (sym) or word of ``op`` in ``language``, for prompts."""
        return op if language == SYMBOLIC else SPELLED_LANGUAGES[language].ops[op]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


_INT_RE = re.compile(r"[+-]?\d{1,40}")


def parse_int(text: str) -> int | None:
    """An integer answer (optional sign, at most 40 digits), or None; stricter than ``int()``, which also
    accepts ``"1_000"`` and inner whitespace."""
    return int(text) if _INT_RE.fullmatch(text) else None


def take_records(
    name: str,
    sample: Any,
    split: str,
    n: int | None,
    test_size: int,
    unique: bool | None,
    hint: str,
    noun: str = "records",
) -> list[dict[str, Any]]:
    """``n`` records ``sample(split, 0..)`` of a task (see :meth:`VerifiableTask.records` for the arguments).

    Raises:
        ValueError: ``n`` missing for train, or fewer than ``n`` distinct records (by ``key``) found in the split;
            ``hint`` says what to change.
    """
    if n is None:
        if split != "test":
            raise ValueError("records('train') needs n")
        n = test_size
    if unique is None:
        unique = split == "test"
    if not unique:
        return [sample(split, i) for i in range(n)]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    limit = 20 * n + 1000  # generous: duplicates are rare unless the split is nearly exhausted
    for index in range(limit):
        record = sample(split, index)
        if record["key"] not in seen:
            seen.add(record["key"])
            out.append(record)
            if len(out) == n:
                return out
    raise ValueError(
        f"{name}: only {len(out)} distinct {split} {noun} found in {limit} samples, fewer than n={n}; {hint}"
    )
