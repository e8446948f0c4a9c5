"""Time by component from profiler events (dsk.profile.attribution): forward by part, backward by the forward op's
sequence number, absorbing parts, collectives as communication, and the window filled exactly."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from dsk.model.regions import profile_part
from dsk.profile.attribution import (
    COMMUNICATION,
    OTHER,
    attribute_time,
    part_name,
    sequence_parts,
)


def test_part_names_parse():
    assert part_name("dsk.part:attention") == ("attention", False)
    assert part_name("dsk.part*:mtp") == ("mtp", True)
    assert part_name("dsk.attention.up_projection") is None  # a recompute region is not a part
    assert part_name("aten::mm") is None


def _profiled(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        window_us = (time.perf_counter() - t0) * 1e6
    return prof.events(), window_us


def _labels(events) -> dict[str, set[str]]:
    """Part -> the names of the backward nodes attributed to it."""
    seq_of = sequence_parts(events)
    out: dict[str, set[str]] = {}
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function: ") and e.sequence_nr in seq_of:
            out.setdefault(seq_of[e.sequence_nr], set()).add(e.name.rpartition(": ")[2])
    return out


def test_the_backward_goes_to_the_part_whose_forward_made_it():
    torch.manual_seed(0)
    big, small = torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)
    x = torch.randn(512, 256)

    def step():
        with profile_part("big"):
            h = big(x).relu()
            h = big(h).relu()
        with profile_part("small"):
            y = small(h[:4])
        y.sum().backward()

    step()
    events, window_us = _profiled(step)
    result = attribute_time(events, window_us)
    assert set(result.raw_seconds) <= {"big", "small", OTHER}
    assert sum(result.raw_seconds.values()) == pytest.approx(window_us / 1e6, rel=1e-9)  # the window, exactly
    labels = _labels(events)
    assert "AddmmBackward0" in labels["big"] and "ReluBackward0" in labels["big"]
    assert "AddmmBackward0" in labels["small"]
    # big holds two products, two activations and their four backward products; small one product (counted, not timed)
    assert result.events["big"] > result.events["small"]


def test_an_absorbing_part_takes_its_nested_parts():
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)

    def step():
        with profile_part("mtp", absorb=True):
            with profile_part("attention"):
                y = lin(x)
        with profile_part("attention"):
            z = lin(y)
        z.sum().backward()

    events, window_us = _profiled(step)
    result = attribute_time(events, window_us)
    assert "mtp" in result.raw_seconds and "attention" in result.raw_seconds
    labels = _labels(events)
    assert labels["mtp"] >= {"AddmmBackward0"}  # the first product ran in attention, inside the absorbing mtp
    assert labels["attention"] >= {"AddmmBackward0"}  # the second in attention alone


def test_collectives_are_communication_wherever_they_run(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        t = torch.randn(1 << 16)

        def step():
            with profile_part("optimizer"):
                dist.all_reduce(t)
                t.mul_(0.5)

        events, window_us = _profiled(step)
        result = attribute_time(events, window_us)
        assert result.raw_seconds[COMMUNICATION] > 0
        assert result.events[COMMUNICATION] >= 1
        assert "optimizer" in result.raw_seconds  # the part's own op and range
    finally:
        dist.destroy_process_group()


def test_the_profilers_cost_comes_out_per_recorded_event():
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, requires_grad=True)

    def step():
        with profile_part("a"):
            lin(x).sum().backward()

    events, window_us = _profiled(step)
    raw = attribute_time(events, window_us)
    cost = 1e-6
    corrected = attribute_time(events, window_us, per_event_s=cost)
    for part, seconds in raw.raw_seconds.items():
        assert corrected.seconds[part] == pytest.approx(max(0.0, seconds - cost * raw.events.get(part, 0)))
