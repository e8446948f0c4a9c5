"""JSONL data sources: ``{"text": ...}`` rows for pre-training, ``{"prompt": ..., "completion": ...}`` rows for SFT.

Every error names the file and the 1-based line number, so a bad row in a million-line file is found at once.
Blank lines are skipped. Extra keys are kept in the records (an SFT row may carry an ``answer`` column for a
reward). Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from dsk.errors import InputError

__all__ = ["DataError", "JsonlSource", "iter_jsonl", "read_jsonl"]

Kind = Literal["text", "sft", "auto"]
_REQUIRED: dict[str, tuple[str, ...]] = {"text": ("text",), "sft": ("prompt", "completion")}


class DataError(InputError):
    """A data file is missing or malformed: ``file`` and the 1-based ``line`` say where (the message starts with
    ``path:line:``); the CLI reports it as bad input (exit 2)."""


def _detect_kind(row: dict[str, Any], path: Path, lineno: int) -> str:
    if "prompt" in row and "completion" in row:
        return "sft"
    if "text" in row:
        return "text"
    raise DataError(
        f"row has keys {sorted(row)}; expected 'text' (pre-training) or 'prompt' and 'completion' (SFT)",
        file=path,
        line=lineno,
    )


def _check_keys(row: dict[str, Any], kind: str, path: Path, lineno: int) -> None:
    for key in _REQUIRED[kind]:
        if key not in row:
            raise DataError(
                f"missing key {key!r} for a {kind} row (row has keys {sorted(row)})", file=path, line=lineno
            )
        if not isinstance(row[key], str):
            raise DataError(f"key {key!r} must be a string, got {type(row[key]).__name__}", file=path, line=lineno)


def iter_jsonl(path: str | Path, kind: Kind = "auto") -> Iterator[dict[str, Any]]:
    """Yield the rows of one JSONL file, checked against ``kind``.

    Rows are read one at a time, so a bad row far into a file stops the reader only when it gets there (a reader
    that streams the file during a run meets it mid-run, and it is bad input all the same).

    Args:
        path: the file.
        kind: ``"text"`` (each row needs a string ``text``), ``"sft"`` (string ``prompt`` and ``completion``) or
            ``"auto"`` (decided by the first row; every later row must be of the same kind).

    Raises:
        DataError: the file cannot be opened, or a row is not UTF-8, invalid JSON, not an object, misses a key or
            has a non-string value; ``file`` and ``line`` say where, and the message starts with ``path:line:``.
    """
    path = Path(path)
    if kind not in ("text", "sft", "auto"):
        raise ValueError(f"JSONL kind={kind!r}: must be 'text', 'sft' or 'auto'")
    try:
        # binary, decoded line by line: a text-mode reader decodes ahead in chunks and would blame the wrong line
        f = path.open("rb")
    except FileNotFoundError:
        raise DataError("no such JSONL file", file=path) from None
    except OSError as e:
        raise DataError(f"cannot read it ({e.strerror or e})", file=path) from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start + 1})", file=path, line=lineno) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", file=path, line=lineno) from None
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", file=path, line=lineno)
            if kind == "auto":
                kind = _detect_kind(row, path, lineno)  # type: ignore[assignment]
            _check_keys(row, kind, path, lineno)
            yield row


def read_jsonl(path: str | Path, kind: Kind = "auto") -> list[dict[str, Any]]:
    """All rows of one JSONL file as a list (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path, kind))


class JsonlSource(Sequence):
    """A finite, random-access data source read from one or more JSONL files (held in memory).

    Args:
        paths: one path or a list of paths, read in order.
        kind: ``"text"``, ``"sft"`` or ``"auto"``; with ``"auto"`` all files must hold the same kind.

    Attributes:
        kind: the resolved kind (``"text"`` or ``"sft"``).
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], kind: Kind = "auto"):
        self.paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("JsonlSource needs at least one path")
        self._rows: list[dict[str, Any]] = []
        resolved: str | None = None if kind == "auto" else kind
        for path in self.paths:
            rows = read_jsonl(path, resolved or "auto")  # type: ignore[arg-type]
            if rows and resolved is None:
                resolved = "sft" if "completion" in rows[0] and "prompt" in rows[0] else "text"
            self._rows.extend(rows)
        if not self._rows:
            raise DataError("no rows", file=", ".join(map(str, self.paths)))
        self.kind = resolved

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return self._rows[index]

    def __repr__(self) -> str:
        return f"JsonlSource({len(self)} {self.kind} rows from {len(self.paths)} file(s))"
