"""The built-in reward functions: ``fn(config, prompts, completions, **columns) -> list[float | None]``.

What a trainer passes (``dsk_rl`` does; see docs/post-training.md):

- ``prompts``, ``completions``: one string per completion (the completion decoded without EOS/padding, with the
  ``<think>``/``<answer>`` markup kept);
- every column of the records the prompts came from, as one list per column (``answer``, ``task``, ``language``,
  ``numbers``...), repeated for each completion of a prompt;
- ``completion_ids`` (token ids per completion) and ``truncated`` (the completion hit the length limit);
- scalars: ``max_completion_length`` and ``checker``, the task's own ``check(record, text) -> bool``.

``None`` means "not applicable" (no reference answer, no chain of thought to judge): the trainer leaves it out of
the group statistics. Rewards are plain Python over strings (no torch): they run once per completion, and a reward
that raised would lose the whole batch, so the checkers never raise on malformed text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from dsk.api.runtime import extract_answer, extract_think
from dsk_rewards.config import AccuracyConfig, FormatConfig, LanguageConsistencyConfig, OverlongConfig, StepsConfig

__all__ = ["accuracy", "format_reward", "language_consistency", "overlong", "rows_of", "steps"]

Checker = Callable[[dict[str, Any], str], "bool | None"]

_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.S)
_ANSWER_ONLY_RE = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.S)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def rows_of(columns: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Per-completion records rebuilt from the column lists (scalar keywords are left out)."""
    cols = {k: v for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) == n}
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


def _exact_match(record: dict[str, Any], text: str) -> bool:
    # several answer blocks earn nothing: listing candidates is a reward hack (Visual-RFT #79)
    answer = extract_answer(text)
    return answer is not None and answer == str(record["answer"]).strip()


def _registry_checkers(task_names: Sequence[Any] | None, registry: Any) -> Checker:
    """A checker that asks the task named in each record's ``task`` column (built once per name, default options,
    from the run's ``registry``; without one, or for an unknown name, the answer text is compared)."""
    if not task_names or registry is None:
        return _exact_match
    from dsk.api import build_component

    tasks: dict[str, Any] = {}
    for name in set(task_names):
        if isinstance(name, str):
            try:
                tasks[name] = build_component(registry, "task", name)
            except Exception:  # an unknown task name: fall back to comparing the answer text
                continue

    def check(record: dict[str, Any], text: str) -> bool:
        task = tasks.get(record.get("task"))  # type: ignore[arg-type]
        return task.check(record, text) if task is not None else _exact_match(record, text)

    return check


def accuracy(
    config: AccuracyConfig,
    prompts: list[str],
    completions: list[str],
    *,
    checker: Checker | None = None,
    registry: Any = None,
    **columns: Any,
) -> list[float | None]:
    """``correct`` when the task's checker accepts the completion, else ``wrong``; None for a record without
    ``answer`` (non-reasoning data mixed into a batch).

    The checker is the trainer's task (``checker=task.check``); without one, the task named by the ``task`` column
    is built from the registry, and without that the ``<answer>`` text is compared with ``answer`` verbatim.
    """
    rows = rows_of(columns, len(completions))
    check = checker if checker is not None else _registry_checkers(columns.get("task"), registry)
    out: list[float | None] = []
    for record, text in zip(rows, completions, strict=True):
        if record.get("answer") is None:
            out.append(None)
            continue
        try:
            ok = check(record, text)
        except Exception:  # a checker must not raise; if one does, it cannot judge this completion
            ok = None
        out.append(None if ok is None else config.correct if ok else config.wrong)
    return out


def _format_score(config: FormatConfig, text: str) -> float:
    counts = [text.count(tag) for tag in _TAGS]
    think_ok = counts[0] == 1 and counts[1] == 1
    answer_ok = counts[2] == 1 and counts[3] == 1
    if config.require_think:
        match = _FORMAT_RE.fullmatch(text) if think_ok and answer_ok else None
        parts = match.groups() if match else None
    else:
        no_think = counts[0] == 0 and counts[1] == 0
        match = None
        if think_ok and answer_ok:
            match = _FORMAT_RE.fullmatch(text)
        elif no_think and answer_ok:
            match = _ANSWER_ONLY_RE.fullmatch(text)
        parts = match.groups() if match else None
    if parts is not None and (config.allow_empty or all(p.strip() for p in parts)):
        return 1.0
    return config.partial if think_ok and answer_ok else 0.0


def format_reward(
    config: FormatConfig, prompts: list[str], completions: list[str], **columns: Any
) -> list[float | None]:
    """1 for a completion that is exactly ``<think>…</think><answer>…</answer>`` (whitespace between allowed),
    each tag once and both blocks non-empty; ``partial`` when every tag appears once but the layout is wrong;
    else 0. Repeated closing tags (TinyZero PR #112) and empty blocks (Soup #814) get 0."""
    return [_format_score(config, text) for text in completions]


def language_consistency(
    config: LanguageConsistencyConfig, prompts: list[str], completions: list[str], **columns: Any
) -> list[float | None]:
    """``Num(Words_target) / Num(Words)`` over the chain of thought (DeepSeek-R1 §2.3.2), in [0, 1].

    The target language of each completion is its record's ``language`` column (the language the task wrote the
    prompt in). For the symbolic language ``sym`` the share is of symbolic chunks (``7+5=12``) among chunks and
    words. None when the record has no language or the completion has nothing to score (no think block, no word):
    a missing think block is the format reward's business.
    """
    from dsk.api.runtime import LANGUAGES
    from dsk.api.runtime import language_consistency as share

    languages = columns.get(config.column)
    out: list[float | None] = []
    for i, text in enumerate(completions):
        language = languages[i] if isinstance(languages, (list, tuple)) else None
        if language not in LANGUAGES:
            out.append(None)
            continue
        cot = extract_think(text) if config.scope == "think" else text
        out.append(None if cot is None else share(cot, language))
    return out


def overlong(
    config: OverlongConfig,
    prompts: list[str],
    completions: list[str],
    *,
    completion_ids: Sequence[Sequence[int]] | None = None,
    max_completion_length: int | None = None,
    **columns: Any,
) -> list[float | None]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) on the completion length in tokens.

    ``0`` if ``len <= L_max - C``; ``(L_max - C - len) / C`` (from 0 down to -1) if ``L_max - C < len <= L_max``;
    ``-1`` beyond ``L_max``. Lengths are token counts from ``completion_ids`` (characters when absent).
    """
    limit = config.max_length if config.max_length is not None else max_completion_length
    if limit is None:
        raise ValueError("reward 'overlong' needs max_length (or a trainer that passes max_completion_length)")
    buffer = min(config.buffer, limit)
    start = limit - buffer
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(t) for t in completions]
    out: list[float | None] = []
    for n in lengths:
        if n <= start:
            out.append(0.0)
        elif n <= limit:
            out.append((start - n) / buffer)
        else:
            out.append(-1.0)
    return out


def steps(config: StepsConfig, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
    """Share of the arithmetic steps in the ``<think>`` block that are right (:func:`dsk_rewards.steps.check_steps`);
    with ``all_or_nothing``, 1 when all are. None without a think block or without any step to check.

    An outcome reward accepts a right answer after wrong steps; filtering rejection-sampled traces on this as well
    keeps the model from learning that steps need not add up (post_training.md §5.2, T7's process reward).
    """
    from dsk_rewards.steps import check_steps

    out: list[float | None] = []
    for text in completions:
        cot = extract_think(text)
        right, total = check_steps(cot) if cot is not None else (0, 0)
        if total == 0:
            out.append(None)
        elif config.all_or_nothing:
            out.append(float(right == total))
        else:
            out.append(right / total)
    return out
