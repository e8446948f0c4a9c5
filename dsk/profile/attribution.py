"""Time by component from ``torch.profiler`` events: the forward by the profile parts it ran in, the backward by the
part of the forward op that made each autograd node.

The model's parts are ``record_function`` ranges opened by :func:`dsk.api.runtime.profile_part` (named
``dsk.part:<name>``, or ``dsk.part*:<name>`` for a part that absorbs the parts nested in it). A component names its
own parts (the core: ``attention``, ``ffn``, ``norm``, ``head``, ``loss``, ``optimizer``...; an MoE layer:
``router``, ``routed_experts``, ``shared_experts``), so this module names no technique. The rules:

1. An event's part is the innermost part range around it, or the outermost absorbing one when there is one.
2. The backward: the engine runs each autograd node inside an ``autograd::engine::evaluate_function: ...`` event
   that carries the node's sequence number, the same number the profiler gave the forward op that created the node.
   So a backward event takes the part of the forward op with its sequence number.
3. A collective or point-to-point op (``c10d::*``, ``gloo:*``, ``nccl:*``, ``record_param_comms``) and everything
   under it is ``communication`` wherever it runs.
4. Each event contributes its self time (its duration less its children's), so nothing counts twice; time on the
   measured threads outside every event (Python between ops at the top level) is ``other``, and so is an event no
   rule labels (gradient accumulation nodes, the trainer's batching).

The raw seconds add up to the wall time of the window given, by construction; but that window ran slower than an
unprofiled one, by the profiler's cost of recording each op (a few microseconds, which a tiny model's thousands of
small ops per step feel). Given that cost per op (``per_event_s``; :mod:`dsk.profile.session` takes it from the
run itself), it is taken out of each part per event recorded in it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dsk.model.regions import PART_PREFIX

__all__ = [
    "COMMUNICATION",
    "OTHER",
    "Attribution",
    "attribute_time",
    "part_name",
    "sequence_parts",
]

COMMUNICATION = "communication"
OTHER = "other"
_BACKWARD = "autograd::engine::evaluate_function: "
_COMM_PREFIXES = ("c10d::", "gloo:", "nccl:", "record_param_comms")


def part_name(event_name: str) -> tuple[str, bool] | None:
    """``(name, absorbs)`` of a profile part's range name (``dsk.part:attention``), else None."""
    if not event_name.startswith(PART_PREFIX):
        return None
    rest = event_name[len(PART_PREFIX) :]
    absorbs = rest.startswith("*")
    if absorbs:
        rest = rest[1:]
    if not rest.startswith(":"):
        return None
    return rest[1:], absorbs


def _is_comm(name: str) -> bool:
    return name.startswith(_COMM_PREFIXES)


def _forward_part(event: Any) -> str | None:
    """The part of an event by rule 1 (its enclosing part ranges, itself included)."""
    innermost = outermost_absorbing = None
    node = event
    while node is not None:
        found = part_name(node.name)
        if found is not None:
            name, absorbs = found
            if innermost is None:
                innermost = name
            if absorbs:
                outermost_absorbing = name
        node = node.cpu_parent
    return outermost_absorbing or innermost


def _model_threads(events: list[Any]) -> set[int]:
    """The threads that ran the model: those with a part range or a backward node (a GPU backward has its own)."""
    return {e.thread for e in events if part_name(e.name) is not None or e.name.startswith(_BACKWARD)}


def sequence_parts(events: Iterable[Any]) -> dict[int, str]:
    """Sequence number -> the part of the forward op that made the autograd node with it (rule 2)."""
    events = list(events)
    threads = _model_threads(events)
    out: dict[int, str] = {}
    for e in events:
        if e.thread in threads and e.sequence_nr >= 0 and not e.name.startswith(_BACKWARD):
            part = _forward_part(e)
            if part is not None:
                out.setdefault(e.sequence_nr, part)
    return out


def _duration_us(event: Any) -> float:
    return max(0.0, float(event.time_range.end - event.time_range.start))


@dataclass
class Attribution:
    """What :func:`attribute_time` found.

    Attributes:
        seconds: part name -> seconds over the window, the profiler's own cost taken out (``per_event_s`` x the
            events recorded in the part; never below 0).
        raw_seconds: part name -> seconds as recorded (they add up to the window).
        events: part name -> events recorded in it.
        device_seconds: part name -> seconds of the device kernels its ops launched (a GPU run: the profiler links
            each kernel to the op that launched it; empty on a CPU run).
    """

    seconds: dict[str, float]
    raw_seconds: dict[str, float]
    events: dict[str, int]
    device_seconds: dict[str, float]


def attribute_time(events: Iterable[Any], window_us: float | None = None, per_event_s: float = 0.0) -> Attribution:
    """Seconds by part over the profiled ``events`` (``torch.profiler.profile().events()``).

    Args:
        events: the profiler's ``FunctionEvent`` list (parents and children linked, as ``events()`` returns them).
        window_us: the wall time the events were recorded in, microseconds; the time of the measured threads
            outside every top-level event goes to ``other`` (None: no such filling, the parts sum to the events).
        per_event_s: the profiler's cost of one recorded event, taken out of the part each event is recorded in.
    """
    events = list(events)
    threads = _model_threads(events)
    seq_part = sequence_parts(events)

    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    device: dict[str, float] = defaultdict(float)
    top_level_us = 0.0

    def walk(event: Any, inherited: str | None) -> None:
        if _is_comm(event.name):
            label: str | None = COMMUNICATION
        elif event.name.startswith(_BACKWARD):
            label = seq_part.get(event.sequence_nr, inherited)
        else:
            found = part_name(event.name)
            label = inherited
            if found is not None:
                label = _forward_part(event)
        children = [c for c in event.cpu_children if c.thread == event.thread]
        self_us = _duration_us(event) - sum(_duration_us(c) for c in children)
        totals[label or OTHER] += max(0.0, self_us) / 1e6
        counts[label or OTHER] += 1
        device_us = float(getattr(event, "self_device_time_total", 0.0) or 0.0)
        if device_us > 0:
            device[label or OTHER] += device_us / 1e6
        for child in children:
            walk(child, COMMUNICATION if label == COMMUNICATION else label)

    for thread in threads:
        roots = sorted(
            (e for e in events if e.thread == thread and e.cpu_parent is None), key=lambda e: e.time_range.start
        )
        end = float("-inf")
        for root in roots:
            if root.time_range.start < end:  # recorded without a parent link but inside the previous one
                continue
            end = float(root.time_range.end)
            top_level_us += _duration_us(root)
            walk(root, COMMUNICATION if _is_comm(root.name) else None)
    if window_us is not None:
        # one thread's wall time: the model threads run one after the other (a GPU backward while the main waits)
        gap = window_us - top_level_us
        if gap > 0:
            totals[OTHER] += gap / 1e6
    raw = {k: v for k, v in totals.items() if v > 0}
    seconds = {k: max(0.0, v - per_event_s * counts.get(k, 0)) for k, v in raw.items()}
    return Attribution(seconds=seconds, raw_seconds=raw, events=dict(counts), device_seconds=dict(device))
