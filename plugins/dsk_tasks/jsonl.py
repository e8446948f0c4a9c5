"""JSONL files behind the task interface, so a recipe's ``[data]`` slot takes a file as easily as a generator.

Rows are the records: ``{"text"}`` rows for pre-training, ``{"prompt", "completion"}`` rows for SFT, and an optional
``answer`` column that ``check`` compares with the answer of a completion. ``sample(split, i)`` walks the rows of a
split in an order reshuffled every epoch from ``(seed, split, epoch)``, so ``sample`` is deterministic and an
infinite stream of indices covers each row once per epoch. Without a separate test file, rows are held out by a hash
of their prompt (or text), so duplicated rows can never sit on both sides.
"""

from __future__ import annotations

import random
from typing import Any

from dsk.api.runtime import DataError, JsonlSource, extract_answer
from dsk_tasks.base import SPLITS, stable_hash
from dsk_tasks.config import JsonlConfig

__all__ = ["JsonlTask"]


class JsonlTask:
    """The rows of JSONL files as train/test records; files are read (and checked) when the task is built."""

    name = "jsonl"

    def __init__(self, config: JsonlConfig):
        self.config = config
        source = JsonlSource(config.path, kind=config.kind)
        self.kind = source.kind
        if config.test_path is not None:
            train, test = list(source), list(JsonlSource(config.test_path, kind=source.kind))
        else:
            train, test = [], []
            for row in source:
                text = row["prompt"] if self.kind == "sft" else row["text"]
                is_test = stable_hash(f"jsonl|{text}") % 100 < config.test_percent
                (test if is_test else train).append(row)
        if config.test_size is not None:
            test = test[: config.test_size]
        self._rows = {"train": train, "test": test}
        # One cached epoch order per split: derived from (seed, split, epoch), never state that affects results.
        self._orders: dict[str, tuple[int, list[int]]] = {}

    def _rows_of(self, split: str) -> list[dict[str, Any]]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: must be 'train' or 'test'")
        rows = self._rows[split]
        if not rows:
            # bad input, not a crash: the files (or test_percent) give this split nothing
            files = self.config.test_path if split == "test" and self.config.test_path else self.config.path
            raise DataError(
                f"the jsonl task has no {split} rows (set test_path or test_percent for a test split)",
                file=files if isinstance(files, str) else ", ".join(files),
            )
        return rows

    def _order(self, split: str, epoch: int) -> list[int]:
        cached = self._orders.get(split)
        if cached is None or cached[0] != epoch:
            order = list(range(len(self._rows[split])))
            random.Random(f"dsk-jsonl:{self.config.seed}:{split}:{epoch}").shuffle(order)
            self._orders[split] = cached = (epoch, order)
        return cached[1]

    def __len__(self) -> int:
        """Number of training rows."""
        return len(self._rows["train"])

    def sample(self, split: str, index: int) -> dict[str, Any]:
        """The row at ``index`` of ``split`` (epoch ``index // n``, shuffled), with ``split`` and ``index`` added."""
        rows = self._rows_of(split)
        if index < 0:
            raise ValueError(f"index={index}: must be >= 0")
        epoch, offset = divmod(index, len(rows))
        return {**rows[self._order(split, epoch)[offset]], "split": split, "index": index}

    def records(self, split: str, n: int | None = None, *, unique: bool | None = None) -> list[dict[str, Any]]:
        """``n`` records of ``split`` (default: every row of the split once).

        With ``unique`` (the default for the test split) no row is repeated: at most every row of the split is
        returned, fewer than ``n`` when the file is smaller. Otherwise the records are ``sample(split, 0..n-1)``,
        running over as many epochs as ``n`` needs.
        """
        n_rows = len(self._rows_of(split))
        n = n_rows if n is None else n
        if split == "test" if unique is None else unique:
            n = min(n, n_rows)
        return [self.sample(split, i) for i in range(n)]

    def extract_answer(self, text: str) -> str | None:
        """The answer in a completion (see :func:`dsk.data.completions.extract_answer`)."""
        return extract_answer(text, require_format=self.config.require_format)

    def check(self, record: dict[str, Any], completion_text: str) -> bool:
        """Whether the extracted answer equals the record's ``answer`` column (exact text after stripping).

        Raises:
            ValueError: the record has no ``answer`` column (the data cannot be checked).
        """
        if "answer" not in record:
            raise ValueError(f"jsonl record has no 'answer' column (keys {sorted(record)}); it cannot be checked")
        answer = self.extract_answer(completion_text)
        return answer is not None and answer == str(record["answer"]).strip()

    def __repr__(self) -> str:
        return f"JsonlTask({len(self._rows['train'])} train / {len(self._rows['test'])} test {self.kind} rows)"
