"""The exception every piece of dsk raises for bad input: :class:`InputError`.

Bad input is anything the user can fix without changing code: a recipe value, a command-line option, a data file's
malformed row, a missing tokenizer file, a checkpoint that does not load. Whoever finds it raises an ``InputError``
(or a subclass: ``RunSetupError``, ``CheckpointLoadError``, ``DataError``, ...) naming what is wrong and where; the
CLI prints it on one line, without a traceback, and exits with code 2 (``1`` stays for a run that failed, such as
one that diverged). This module sits at the bottom of the core's layers: it imports nothing from dsk, and nothing
heavy, so any module (and any plugin, through ``dsk.api``) can raise it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input: what is wrong and, when known, where (a file and a 1-based line).

    ``str(error)`` is ``"file:line: message"``, ``"file: message"`` or just ``"message"``; the file and line stay
    readable as attributes for a caller that reports them its own way. A subclass of ``ValueError``, so code that
    catches ``ValueError`` around a parser keeps working.

    Args:
        message: what is wrong, naming the bad value and what is allowed.
        file: the file that holds the bad input, if any.
        line: the 1-based line in ``file``, if known.

    Attributes:
        message: the message without its location.
        file: the file as a string, or None.
        line: the line, or None.
    """

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None):
        self.message = str(message)
        self.file = None if file is None else str(file)
        self.line = line
        super().__init__(self.where + self.message)

    @property
    def where(self) -> str:
        """The location prefix, ``"file:line: "`` or ``"file: "`` (empty when no file is known)."""
        if self.file is None:
            return ""
        return f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
