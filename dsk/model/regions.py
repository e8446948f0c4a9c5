"""Named regions of a component's forward, and whether the forward is running again for a recomputation.

A component marks parts of its forward with ``with region("norm"):`` (the core's RMSNorm does), e.g.
``"attention.up_projection"``, ``"ffn.activation"``. Features read the current regions while the ops run: a
selective-recomputation policy recomputes the ops of chosen regions instead of saving their outputs, and the
profiler attributes time to them (under ``torch.profiler`` each region is also a ``record_function`` range named
``dsk.<region>``). Outside the profiler and with no feature reading them, a region costs a list append and pop.

Where a region is a pure function of a few tensors, the component calls it as ``recomputable(name, fn, *inputs)``
instead: by default that is ``fn(*inputs)`` inside ``region(name)``, and while a feature has installed a handler
(:func:`region_handler`) with gradients on, the handler runs it, and may keep ``fn`` and its inputs instead of the
outputs for the backward (selective recomputation recomputes the RMSNorms and the MLA up-projections this way).

A recomputation feature runs the re-executed forward inside :func:`recompute_scope`; a component whose forward has a
side effect that must happen once per real forward (a router counting expert loads) checks :func:`recomputing`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

__all__ = [
    "PART_PREFIX",
    "current_regions",
    "profile_part",
    "recompute_scope",
    "recomputable",
    "recomputing",
    "region",
    "region_handler",
]

_state = threading.local()


def _stack() -> list[str]:
    stack = getattr(_state, "regions", None)
    if stack is None:
        stack = _state.regions = []
    return stack


class region:  # noqa: N801 (used as a function: ``with region("norm"):``)
    """Mark the ops run inside as belonging to region ``name`` (nestable; innermost last).

    A class rather than a generator context manager: it runs in every layer of every decode step, where
    contextlib's generator machinery costs more than the ops it marks.
    """

    __slots__ = ("name", "_range")

    def __init__(self, name: str):
        self.name = name
        self._range = None

    def __enter__(self) -> None:
        _stack().append(self.name)
        if torch.autograd.profiler._is_profiler_enabled:
            self._range = torch.profiler.record_function(f"dsk.{self.name}")
            self._range.__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            if self._range is not None:
                self._range.__exit__(*exc)
                self._range = None
        finally:
            _stack().pop()


#: the ``record_function`` name of a profile part is this prefix, ``*`` when it absorbs its nested parts, ``:`` and
#: the part's name (``dsk.part:attention``, ``dsk.part*:mtp``)
PART_PREFIX = "dsk.part"


def profile_part(name: str, *, absorb: bool = False) -> AbstractContextManager[Any]:
    """Attribute the time of what runs inside, forward and backward, to part ``name`` in ``dsk profile``'s table.

    Parts nest and the innermost one takes the time, unless an enclosing part was opened with ``absorb=True``: then
    that part takes the time of everything inside it (an MTP module's blocks count as "mtp", not as "attention").
    The backward of an op is attributed to the part its forward ran in. Outside ``torch.profiler`` a part costs one
    flag test (a shared no-op context); unlike :func:`region`, it changes nothing a feature sees.
    """
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(f"{PART_PREFIX}{'*' if absorb else ''}:{name}")
    return _NO_PART


_NO_PART = nullcontext()


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


#: ``handler(name, fn, inputs) -> outputs``: runs a :func:`recomputable` region while installed
RegionHandler = Callable[[str, Callable[..., Any], tuple], Any]


def recomputable(name: str, fn: Callable[..., Any], *inputs: Any) -> Any:
    """``fn(*inputs)`` as region ``name``: a pure function of ``inputs`` (and the module's parameters), so a feature
    may drop its outputs after the forward and call it again when the backward needs them."""
    handler = getattr(_state, "handler", None)
    if handler is None or not torch.is_grad_enabled():
        with region(name):
            return fn(*inputs)
    return handler(name, fn, inputs)


@contextmanager
def region_handler(handler: RegionHandler | None) -> Iterator[None]:
    """Install ``handler`` for the :func:`recomputable` regions run inside (None: run them plainly)."""
    previous = getattr(_state, "handler", None)
    _state.handler = handler
    try:
        yield
    finally:
        _state.handler = previous
