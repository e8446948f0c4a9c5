"""``metrics.jsonl``: one JSON object per line, appended and flushed row by row (a crash keeps every row written).

Rows have ``kind`` = ``"train"`` (one per optimizer step: ``step``, ``loss``, ``lr``, ``tokens_per_s``, ...) or
``"eval"`` (``step``, ``eval/accuracy``, ...). Non-finite floats are written as ``null``: strict JSON has no NaN.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "read_metrics"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a ``metrics.jsonl`` (a torn last line, from a killed process, is skipped)."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsWriter:
    """Appends rows to ``path``; ``truncate_after(step)`` drops rows of steps a resumed run will redo.

    Only the writing rank writes (``enabled``); on the other ranks every method is a no-op, so trainers call it
    unconditionally.
    """

    def __init__(self, path: str | Path, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row and flush it to the OS."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(row), allow_nan=False) + "\n")

    def truncate_after(self, step: int) -> int:
        """Keep only rows with ``step <= step`` (written atomically); returns how many rows were dropped."""
        if not self.enabled:
            return 0
        rows = read_metrics(self.path)
        keep = [r for r in rows if int(r.get("step", 0)) <= step]
        if len(keep) == len(rows) and self.path.exists() and self.path.read_text(encoding="utf-8").endswith("\n"):
            return 0
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in keep:
                f.write(json.dumps(r, allow_nan=False) + "\n")
        os.replace(tmp, self.path)
        return len(rows) - len(keep)
