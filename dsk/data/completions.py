"""Reading R1-style completions: the answer in ``<answer>…</answer>`` and the reasoning in ``<think>…</think>``.

Shared by the task checkers (``dsk_tasks``) and by reward functions, so that a reward and a checker never disagree
about what the answer of a completion is. Torch-free.
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "extract_think"]

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)


def extract_answer(text: str, *, require_format: bool = True) -> str | None:
    """The answer written in ``text``, stripped of surrounding whitespace.

    - exactly one ``<answer>…</answer>`` block: its content;
    - several answer blocks, or an answer tag without its partner: None (hedging with several answers, or a
      truncated completion, earns nothing);
    - no answer tag: None when ``require_format``, else the text after the last ``</think>`` (the whole text when
      there is none).
    """
    n_open, n_close = text.count("<answer>"), text.count("</answer>")
    if n_open or n_close:
        blocks = _ANSWER_RE.findall(text)
        return blocks[0].strip() if n_open == 1 and n_close == 1 and len(blocks) == 1 else None
    if require_format:
        return None
    return text.rsplit("</think>", 1)[-1].strip()


def extract_think(text: str) -> str | None:
    """The content of the first ``<think>…</think>`` block (the chain of thought), or None."""
    match = _THINK_RE.search(text)
    return match.group(1) if match else None
