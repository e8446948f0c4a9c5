"""Named regions of a component's forward, and whether the forward is running again for a recomputation.

A component marks parts of its forward with ``with region("norm"):`` (the core's RMSNorm does), e.g.
``"attention.up_projection"``, ``"ffn.activation"``. Features read the current regions while the ops run: a
selective-recomputation policy recomputes the ops of chosen regions instead of saving their outputs, and the
profiler attributes time to them (under ``torch.profiler`` each region is also a ``record_function`` range named
``dsk.<region>``). Outside the profiler and with no feature reading them, a region costs a list append and pop.

A recomputation feature runs the re-executed forward inside :func:`recompute_scope`; a component whose forward has a
side effect that must happen once per real forward (a router counting expert loads) checks :func:`recomputing`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["current_regions", "recompute_scope", "recomputing", "region"]

_state = threading.local()


def _stack() -> list[str]:
    stack = getattr(_state, "regions", None)
    if stack is None:
        stack = _state.regions = []
    return stack


@contextmanager
def region(name: str) -> Iterator[None]:
    """Mark the ops run inside as belonging to region ``name`` (nestable; innermost last)."""
    stack = _stack()
    stack.append(name)
    try:
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function(f"dsk.{name}"):
                yield
        else:
            yield
    finally:
        stack.pop()


def current_regions() -> tuple[str, ...]:
    """The regions the running op is inside, outermost first."""
    return tuple(_stack())


@contextmanager
def recompute_scope() -> Iterator[None]:
    """Run a forward again for a recomputation (activation checkpointing): :func:`recomputing` is True inside."""
    depth = getattr(_state, "recompute", 0)
    _state.recompute = depth + 1
    try:
        yield
    finally:
        _state.recompute = depth


def recomputing() -> bool:
    """Whether the current forward is a recomputation (its side effects already happened once)."""
    return getattr(_state, "recompute", 0) > 0
