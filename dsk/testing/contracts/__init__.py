"""Contract suites a plugin's own tests call with its component, one module per family of kinds.

Each ``check_*`` function builds the component (from a ``build()`` callable, so that it can make fresh ones),
runs it at tiny sizes and raises ``AssertionError`` with a message that says what is wrong and what to fix.
Import the module of the kind you test, e.g. ``from dsk.testing.contracts.model import check_router``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fail(message: str) -> None:
    """Fail the contract check with ``message`` (what is wrong and what to fix)."""
    raise AssertionError(message)


def call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; an exception becomes an AssertionError naming the call."""
    try:
        return fn(*args, **kwargs)
    except AssertionError:
        raise
    except Exception as exc:  # the component broke: say where, keep the cause
        raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}") from exc
