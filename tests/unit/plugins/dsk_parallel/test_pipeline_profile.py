"""What the pipeline strategies report to ``dsk profile`` (:class:`dsk.api.Profiled`), on 2 gloo ranks.

Each rank builds the tiny pipelined model of :mod:`pipeline_helpers` and runs the LM trainer's step: one warm-up
step, ``profile_start``, two measured steps, ``profile_report``, one more step and a second report. Checked on the
writer's report (and that both ranks' reports are the same): both pipeline ranks' actions are in the timeline, each
rank's executed actions per step are the schedule's own list (DualPipe's :func:`dualpipe_actions` in order; 1F1B's
counts from torch's ``Schedule1F1B._get_pipeline_order``, every chunk once per kind; DualPipeV's from torch's
``_calculate_single_rank_operations``), times are ordered and inside their step's span, the bubble equals ``1 -
busy / span`` recomputed here from the returned timeline and lies in [0, 1), and nothing is recorded before the
start or after the report.
"""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from tests.distributed.harness import GROUP, run_ranks
from tests.unit.plugins.dsk_parallel.pipeline_helpers import global_batches, pipeline_steps, pipeline_table

pytestmark = pytest.mark.xdist_group(GROUP)

STEPS = 2
CASES = {"dualpipe": 4, "1f1b": 2, "dualpipev": 4}  # schedule -> chunks (the fewest at PP 2)


def _pipeline(built):
    parallel = built.parallel
    return next(s for s in getattr(parallel, "strategies", [parallel]) if hasattr(s, "profile_report"))


def _torch_counts(strategy) -> dict[str, int]:
    """This rank's F / B / W counts per step in torch's own action list of its schedule."""
    from torch.distributed.pipelining import schedules as S

    schedule = next(iter(strategy._schedules.values()))
    if isinstance(schedule, S.Schedule1F1B):
        actions = schedule._get_pipeline_order()[strategy.pp_rank]
    else:
        ns = SimpleNamespace(pp_group_size=strategy.pp, _n_microbatches=strategy.chunks)
        actions = [
            sub
            for a in S.ScheduleDualPipeV._calculate_single_rank_operations(ns, strategy.pp_rank)
            for sub in (a.sub_actions if a.sub_actions is not None else (a,))
        ]
    kinds = Counter(a.computation_type.value for a in actions if a is not None)
    return {"F": kinds["F"], "B": kinds["B"] + kinds["I"], "W": kinds["W"]}


def _rank(rank: int, world: int, tmp: str) -> dict:
    from tests.unit.plugins.dsk_parallel.test_data import _build

    out = {}
    for kind, chunks in CASES.items():
        built = _build(pipeline_table(kind, chunks=chunks), f"{tmp}/{kind}{rank}")
        strategy = _pipeline(built)
        batches = global_batches(built.base_model.vocab_size, STEPS + 2)
        pipeline_steps(built, batches[:1], 1)  # warm-up: nothing recorded
        before = (list(strategy.timeline), list(strategy._profile_steps), strategy.trace)
        strategy.profile_start()
        pipeline_steps(built, batches[1 : 1 + STEPS], 2)
        report = strategy.profile_report()
        pipeline_steps(built, batches[1 + STEPS :], 2 + STEPS)
        after = (list(strategy.timeline), strategy.trace)
        again = strategy.profile_report()
        out[kind] = {
            "report": report, "before": before, "after": after, "again": again, "stages": [r.index for r in
            strategy.runners], "torch": _torch_counts(strategy) if kind != "dualpipe" else None,
            "zero_bubble": strategy.config.zero_bubble,
        }  # fmt: skip
        built.parallel.teardown()
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_rank, 2, str(tmp_path_factory.mktemp("profile")), timeout=300)


def _actions(report: dict, rank: int, step: int) -> list[dict]:
    return [a for a in report["timeline"] if a["rank"] == rank and a["step"] == step]


@pytest.mark.parametrize("kind", list(CASES))
def test_the_writer_reports_both_ranks_schedules_as_executed(ranks, kind):
    from dsk_parallel.dualpipe import dualpipe_actions

    report = ranks[0][kind]["report"]
    assert ranks[1][kind]["report"] == report  # gathered to every pipeline rank
    assert json.loads(json.dumps(report)) == report
    pp, chunks = 2, CASES[kind]
    assert (report["schedule"], report["pp"], report["chunks"], report["steps"]) == (kind, pp, chunks, STEPS)
    assert {a["rank"] for a in report["timeline"]} == {0, 1}
    for q in range(pp):
        mine = ranks[q][kind]
        for step in range(STEPS):
            acts = _actions(report, q, step)
            assert {a["stage"] for a in acts} == set(mine["stages"])
            if kind == "dualpipe":  # the executed order is the schedule's list, action by action
                want = [
                    (k, q if d == 0 else pp - 1 - q, mb)
                    for k, d, mb in dualpipe_actions(q, pp, chunks, zero_bubble=mine["zero_bubble"])
                ]
                assert [(a["kind"], a["stage"], a["chunk"]) for a in acts] == want
            else:
                counts = Counter(a["kind"] for a in acts)
                assert {k: counts[k] for k in ("F", "B", "W")} == mine["torch"], (q, step)
                for k in ("F", "B"):  # every chunk of every local stage once per kind
                    got = sorted((a["stage"], a["chunk"]) for a in acts if a["kind"] == k)
                    assert got == sorted((s, c) for s in mine["stages"] for c in range(chunks))
        total = sum(1 for a in report["timeline"] if a["rank"] == q)
        assert total == STEPS * len(_actions(report, q, 0))


@pytest.mark.parametrize("kind", list(CASES))
def test_bubble_is_one_minus_busy_over_span_of_the_returned_timeline(ranks, kind):
    report = ranks[0][kind]["report"]
    assert len(report["span_s"]) == STEPS
    fractions: list[list[float]] = [[], []]
    busy: list[list[float]] = [[], []]
    for step, span in enumerate(report["span_s"]):
        acts = [a for a in report["timeline"] if a["step"] == step]
        start, end = min(a["start"] for a in acts), max(a["end"] for a in acts)
        assert span >= end - start > 0  # the step's span holds all its actions
        for q in (0, 1):
            mine = _actions(report, q, step)
            assert all(a["start"] <= a["end"] for a in mine)
            assert all(x["end"] <= y["start"] for x, y in zip(mine, mine[1:], strict=False))  # one at a time
            b = sum(a["end"] - a["start"] for a in mine)
            busy[q].append(b)
            fractions[q].append(1 - b / span)
    for q in (0, 1):
        assert report["busy_s"][q] == pytest.approx(sum(busy[q]) / STEPS, rel=1e-9)
        assert report["bubble"][q] == pytest.approx(sum(fractions[q]) / STEPS, rel=1e-9, abs=1e-12)
        assert 0 <= report["bubble"][q] < 1
    assert min(a["start"] for a in report["timeline"]) >= 0  # after the barrier that is the origin


@pytest.mark.parametrize("kind", list(CASES))
def test_nothing_is_recorded_outside_start_and_report(ranks, kind):
    for r in ranks:
        case = r[kind]
        assert case["before"] == ([], [], False)  # the warm-up step traced nothing
        assert case["after"] == ([], False)  # nor the step after the report
        again = case["again"]
        assert again["steps"] == 0 and again["timeline"] == again["span_s"] == again["bubble"] == []
