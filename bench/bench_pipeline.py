"""Pipeline parallelism on gloo/CPU: the bubble, step time and memory of 1F1B, DualPipeV and DualPipe (issue 12).

The model is ``recipes/dualpipe.toml``'s tiny DeepSeek-V3 (8 layers, dim 64, MLA, DeepSeekMoE, MTP), trained by the
``pretrain`` trainer's own step (64 rows per micro-batch, seq 40, float32, AdamW), built in-process with the real
build path as ``bench_parallel`` does; each rank runs one thread.

Measured at PP 2 (two gloo ranks), per schedule and chunk count (``dualpipe`` with ``zero_bubble = true``); every
case is built and warmed up first, then the traced steps take turns (one step of each case per round), so load from
other processes on the shared cores hits every case alike:

* the timeline: with ``strategy.trace = True`` every executed compute action is logged as (kind F | B | W, model
  stage, chunk, t0, t1) (:mod:`dsk_parallel.pipeline`). A step's *span* runs from the first rank's start of the
  schedule (``run_schedule``) to the last rank's end (``perf_counter`` is the same clock in every process);
  ``bubble`` per rank = (span - the rank's summed compute actions) / span (``dsk_parallel.pipeline.step_bubble``,
  which ``dsk profile`` reports too), and ``bubble`` is the mean over the ranks, the median over the timed steps.
  It counts everything but compute: idle waiting, P2P, the schedules' Python bookkeeping. ``step_s`` is the median wall time of the trainer's whole step (the slowest rank), optimizer
  step included.
* F, B, I, W: the measured duration per chunk of a forward, a full backward, an input-gradient-only backward (a B
  whose W follows) and a weight-gradient step: the median per model stage over the steps (robust to another
  process pre-empting an action on the shared cores), then the mean over the stages. W and I on the first stage
  are left out (its zero-bubble B has no input gradient to compute, so its W is the whole backward).
* ``formula``: spec §3.8 evaluated with those F, B, W (F&B := F + B: on CPU nothing overlaps), over the step's span:
  1F1B (PP-1)(F+B); DualPipe (PP/2-1)(F&B+B-3W) with PP = the ranks (0 at PP 2); DualPipeV the same with PP = 2 x the
  ranks (its stages; at 2 ranks F+2B-3W of a 2-layer stage).
* ``sim``: the simulator below (:func:`simulate`) re-running each step's action lists with the measured duration of
  each of its own actions, communication free: the bubble of the schedule's order and the stages' costs alone
  (measured - sim = P2P waits and the schedules' bookkeeping between actions).
* ``order_ok``: every rank's executed action order equals the list the PP 4 simulation reads
  (:func:`action_lists`).

Computed at PP 4 (four processes on two cores would measure contention, so not run): from each rank's action list
(1F1B: the order ``Schedule1F1B._step_microbatches`` runs, rebuilt here, because torch's ``_get_pipeline_order``
numbers the last rank's forwards from 1; DualPipeV: torch's ``_calculate_single_rank_operations`` called on a
namespace holding the rank and micro-batch counts, no process group; DualPipe: ``dualpipe_actions``; each checked
against the executed order at PP 2) a timeline is simulated:
one action at a time per rank, in list order; F of a chunk on a stage after its F on the previous stage; B (or I)
after the B or I of the next stage; W after its I; communication free. The per-action costs are those measured at
PP 2 under ``dualpipev`` at the same rows per chunk (64 / chunks: PP 4 with 8 chunks takes the PP 2 costs of 8
chunks), whose four 2-layer stages are the only ones with middle stages: a stage of L layers costs L x the per-layer
cost of a middle stage plus, on the first stage, the measured extra of the embedding (and the dense layer 0), on the
last, that of the final norm, the head, the MTP module and the loss. The bubble and the formula then read as at PP 2;
``even`` re-runs the same lists with every stage costing the stages' mean F, B, I, W (the formula's premise of equal
stages), which separates what the schedule leaves idle from what the heavier end stages do.

Memory at PP 2 (one extra step with ``torch.autograd.graph.saved_tensors_hooks`` on every rank):

* parameters: the bytes of the rank's parameters; ``x4`` = with their gradients and AdamW's two moments (fp32),
  next to the measured bytes of the gradients and optimizer state after the step; ``x_share`` = the rank's
  parameters over the whole model's / ranks (DualPipe holds both stages at PP 2: 2x).
* activations: the bytes of the tensors saved for backward that are alive (pack adds a storage's bytes once per
  distinct storage, a ``weakref.finalize`` on the packed tensor takes them off; parameters and buffers are not
  activations), their peak over the step; ``units`` = peak over one chunk's activations of one of the rank's stages
  (the bytes one forward of one chunk saves, measured in the same step: the mean over the rank's stages), next to
  the formula's activations per device: PP for 1F1B, PP+1 for DualPipe (PP = ranks) and DualPipeV (PP = stages).

Rows (``python -m bench pipeline``; ``python -m bench.bench_pipeline`` prints the tables): ``pipeline_bubble``
(dsk = measured bubble, peer = formula, unit fraction of the step's span), ``pipeline_step`` (dsk = step time, peer
= 1F1B's at the same chunks, ratio = peer / dsk), ``pipeline_pp4_bubble`` / ``pipeline_pp4_step`` (the same,
simulated), ``pipeline_activations`` (dsk = peak units, peer = formula units; ratio = peer / dsk),
``pipeline_params`` (dsk = parameter + gradient + AdamW bytes per rank, the largest rank; peer = the even share of
the model's; ratio = dsk / peer, the multiple of the even share). Speed numbers only; nothing here is asserted.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.lm_run import lm_run

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ, PP, LAYERS = 64, 40, 2, 8
KINDS = ("1f1b", "dualpipev", "dualpipe")
#: stages per rank of each schedule: ``dualpipev`` cuts the model into 2 x PP stages
STAGES_PER_RANK = {"1f1b": 1, "dualpipev": 2, "dualpipe": 1}

Action = tuple[str, int, int, int]  # (kind F | B | I | W, chain, stage along the chain, chunk)


# -- the run -------------------------------------------------------------------------------------------------------
def _build(tmp: Path, kind: str, chunks: int) -> Any:
    """A set-up ``pretrain`` run of ``recipes/dualpipe.toml`` at PP 2 under schedule ``kind`` with ``chunks``."""
    sets = [  # type first: setting it drops the table's other keys
        f'parallel.pipeline.type="{kind}"', f"parallel.pipeline.pp={PP}", f"parallel.pipeline.chunks={chunks}",
        "parallel.pipeline.zero_bubble=true", f"trainer.batch_size={BATCH}", f"trainer.seq_len={SEQ}",
        'trainer.device="cpu"',
    ]  # fmt: skip
    run = lm_run("dualpipe.toml", tmp, [("set", x) for x in sets])
    return run


def _pipeline_of(run: Any) -> Any:
    """The run's pipeline strategy (the run's strategy, or the one of a composite that keeps a timeline)."""
    strategy = run.built.parallel
    for s in [strategy, *getattr(strategy, "strategies", [])]:
        if hasattr(s, "timeline"):
            return s
    raise RuntimeError(f"no pipeline strategy in {strategy!r}")


class SavedBytes:
    """Bytes of the tensors autograd saved for backward that are alive: a distinct storage counts once, from its
    first pack until the last tensor packed on it is freed (``weakref.finalize`` on the packed tensor); the
    storages of ``exclude`` (parameters, buffers) are not counted."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [bytes, packed tensors alive]
        self.current = 0
        self.peak = 0

    def pack(self, t: Any) -> Any:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self.exclude:
            return t
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        held = t.detach()  # the graph's own handle, so its release is the saved tensor's
        weakref.finalize(held, self._release, ptr)
        return held

    @staticmethod
    def unpack(t: Any) -> Any:
        return t

    def _release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.current -= entry[0]


def _memory_step(run: Any, strategy: Any) -> dict[str, Any]:
    """One training step with the saved-tensor accounting: the peak, one chunk's bytes per stage, parameters."""
    import torch

    model = run.model
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = SavedBytes(exclude)
    per_stage: dict[int, list[int]] = {}
    for runner in strategy.runners:

        def forward(x: Any, _runner: Any = runner, _inner: Any = runner.forward) -> Any:
            before = saved.current
            out = _inner(x)
            per_stage.setdefault(_runner.index, []).append(saved.current - before)
            return out

        runner.forward = forward
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            run.train_step()
    finally:
        for runner in strategy.runners:
            del runner.forward
    import gc

    gc.collect()
    param_parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("layers.") else "")
        param_parts[part] = param_parts.get(part, 0) + p.numel() * p.element_size()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(
        v.numel() * v.element_size()
        for s in run.optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    return {
        "peak": saved.peak,
        "residual": saved.current,
        "chunk_bytes": {s: statistics.mean(v) for s, v in per_stage.items()},
        "param_parts": param_parts,
        "grad_bytes": grads,
        "state_bytes": state,
    }


def _spawn(world: int, *args: Any) -> list[Any]:
    """``[_rank(rank, world, *args) for each rank]``, each in its own spawned gloo rank, one thread each, with a
    collective timeout of 15 minutes (the traced steps of every case run between two collectives)."""
    from tests.distributed.harness import run_ranks

    return run_ranks(_rank, world, *args, timeout=1800, threads=1, pg_timeout_s=900)


def _rank(rank: int, world: int, cases: list[tuple[str, int]], warmup: int, steps: int) -> list[dict[str, Any]]:
    """On one rank: a run per (schedule, chunks), each warmed up; then the traced steps interleaved round by round
    (one step of every case per round, so load from other processes hits every case alike); then each case's
    memory step."""
    import contextlib

    import torch.distributed as dist

    with contextlib.ExitStack() as stack:
        runs, strategies, spans = [], [], []
        for kind, chunks in cases:
            run = _build(Path(stack.enter_context(tempfile.TemporaryDirectory())), kind, chunks)
            strategy = _pipeline_of(run)
            case_spans: list[tuple[float, float]] = []

            def timed(*args: Any, _inner: Any = strategy.run_schedule, _spans: list = case_spans, **kw: Any) -> Any:
                t0 = time.perf_counter()
                result = _inner(*args, **kw)
                _spans.append((t0, time.perf_counter()))
                return result

            strategy.run_schedule = timed
            for _ in range(warmup):
                run.train_step()
            runs.append(run)
            strategies.append(strategy)
            spans.append(case_spans)
        records: list[list[dict[str, Any]]] = [[] for _ in cases]
        for _ in range(steps):
            for i, (run, strategy) in enumerate(zip(runs, strategies, strict=True)):
                strategy.trace = True
                strategy.timeline = []
                spans[i].clear()
                dist.barrier()
                t0 = time.perf_counter()
                run.train_step()
                step_s = time.perf_counter() - t0
                strategy.trace = False
                records[i].append({"step_s": step_s, "span": spans[i][0], "timeline": list(strategy.timeline)})
        out = []
        for i, ((kind, chunks), run, strategy) in enumerate(zip(cases, runs, strategies, strict=True)):
            memory = _memory_step(run, strategy)
            out.append(
                {"kind": kind, "chunks": chunks, "records": records[i], "memory": memory,
                 "stages": [r.index for r in strategy.runners]}
            )  # fmt: skip
        dist.barrier()
        for run in runs:
            run.built.parallel.teardown()
    return out


# -- action lists ------------------------------------------------------------------------------------------------
def action_lists(kind: str, pp: int, chunks: int) -> dict[int, list[Action]]:
    """Each pipeline rank's compute actions in execution order, as ``(kind, chain, stage, chunk)``.

    ``1f1b``: the order ``Schedule1F1B._step_microbatches`` executes, reconstructed (torch's
    ``_get_pipeline_order`` gives the last rank forwards 1..chunks); ``dualpipev``: torch's own
    ``ScheduleDualPipeV._calculate_single_rank_operations``, called on a namespace with the rank and micro-batch
    counts (no stages, no process group); one chain of ``pp`` or ``2 pp`` stages; an OVERLAP_F_B pair is its F then
    its B (nothing overlaps on CPU). ``dualpipe``: :func:`dualpipe_actions` with zero bubble, chain =
    direction, stage = the model stage (direction 0 runs stage r on rank r, direction 1 stage pp-1-r); a B whose
    W follows is an input-gradient-only backward (I)."""
    from torch.distributed.pipelining import schedules as S

    lists: dict[int, list[Action]] = {}
    if kind == "1f1b":
        # Schedule1F1B._step_microbatches: min(chunks, pp - r) forwards, then B, F alternating, then the Bs left
        # (its _get_pipeline_order, the IR torch only prints, numbers the last rank's forwards from 1)
        for r in range(pp):
            warm = min(chunks, pp - r)
            acts = [("F", 0, r, i) for i in range(warm)]
            for b in range(chunks):
                acts.append(("B", 0, r, b))
                if warm + b < chunks:
                    acts.append(("F", 0, r, warm + b))
            lists[r] = acts
    elif kind == "dualpipev":
        ns = SimpleNamespace(pp_group_size=pp, _n_microbatches=chunks)
        for r in range(pp):
            acts = []
            for a in S.ScheduleDualPipeV._calculate_single_rank_operations(ns, r):
                for sub in a.sub_actions if a.sub_actions is not None else (a,):
                    acts.append((sub.computation_type.value, 0, sub.stage_index, sub.microbatch_index))
            lists[r] = acts
    elif kind == "dualpipe":
        from dsk_parallel.dualpipe import dualpipe_actions

        for r in range(pp):
            acts = [
                (k, d, r if d == 0 else pp - 1 - r, mb)
                for k, d, mb in dualpipe_actions(r, pp, chunks, zero_bubble=True)
            ]
            weights = {(d, s, mb) for k, d, s, mb in acts if k == "W"}
            lists[r] = [("I" if k == "B" and (d, s, mb) in weights else k, d, s, mb) for k, d, s, mb in acts]
    else:
        raise ValueError(kind)
    return lists


def n_stages(kind: str, pp: int) -> int:
    return pp * STAGES_PER_RANK[kind]


def simulate(
    lists: dict[int, list[Action]], stages: int, cost: Callable[[int, Action], float]
) -> tuple[float, dict[int, float]]:
    """The makespan and each rank's busy time of ``lists`` run with ``cost(rank, action)`` per action: one action at a
    time per rank in list order, each as soon as its rank is free and its inputs exist (F after the F of the
    previous stage of its chain, B or I after the B or I of the next stage and its own F, W after its I);
    communication costs nothing. Raises on a deadlock."""
    done: dict[tuple[str, int, int, int], float] = {}
    pos = dict.fromkeys(lists, 0)
    free = dict.fromkeys(lists, 0.0)
    busy = dict.fromkeys(lists, 0.0)
    remaining = sum(len(v) for v in lists.values())
    while remaining:
        progressed = False
        for r, acts in lists.items():
            while pos[r] < len(acts):
                kind, chain, s, mb = acts[pos[r]]
                if kind == "F":
                    deps = [("F", chain, s - 1, mb)] if s > 0 else []
                elif kind in ("B", "I"):
                    deps = [("F", chain, s, mb)] + ([("G", chain, s + 1, mb)] if s < stages - 1 else [])
                else:
                    deps = [("G", chain, s, mb)]
                if any(d not in done for d in deps):
                    break
                start = max([free[r]] + [done[d] for d in deps])
                end = start + cost(r, acts[pos[r]])
                done[("F" if kind == "F" else "G" if kind in ("B", "I") else "W", chain, s, mb)] = end
                free[r], busy[r] = end, busy[r] + end - start
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"simulated schedule deadlocks at {pos}")
    return max(free.values()), busy


def formula_bubble(kind: str, ranks: int, F: float, B: float, W: float) -> float:
    """Spec §3.8's bubble (seconds) with F&B := F + B: 1F1B (PP-1)(F+B); DualPipe (PP/2-1)(F&B+B-3W) with PP the
    ranks; DualPipeV the same with PP its stages (2 x the ranks)."""
    if kind == "1f1b":
        return (ranks - 1) * (F + B)
    pp = ranks if kind == "dualpipe" else 2 * ranks
    return (pp // 2 - 1) * ((F + B) + B - 3 * W)


def formula_activations(kind: str, ranks: int) -> int:
    """Spec §3.8's activations per device in chunk-stages: PP (1F1B), PP+1 (DualPipe; DualPipeV with PP = stages)."""
    if kind == "1f1b":
        return ranks
    return (ranks if kind == "dualpipe" else 2 * ranks) + 1


# -- reading the measurements ------------------------------------------------------------------------------------
def _executed(timeline: list[tuple], rank_list: list[Action]) -> list[tuple[str, int, int]]:
    """A rank's executed actions as (kind, stage, chunk), its Bs that a W follows marked I (as the lists are)."""
    weights = {(s, c) for k, s, c, _, _ in timeline if k == "W"}
    return [("I" if k == "B" and (s, c) in weights else k, s, c) for k, s, c, _, _ in timeline]


def _costs(timelines: list[list[tuple]]) -> dict[tuple[str, int], float]:
    """The median duration per (kind F | B | I | W, model stage) over the ranks' timelines (Bs with a W are I): the
    median, not the mean, so an action another process pre-empted on the shared cores does not inflate it."""
    acc: dict[tuple[str, int], list[float]] = {}
    for tl in timelines:
        weights = {(s, c) for k, s, c, _, _ in tl if k == "W"}
        for k, s, c, t0, t1 in tl:
            kk = "I" if k == "B" and (s, c) in weights else k
            acc.setdefault((kk, s), []).append(t1 - t0)
    return {key: statistics.median(v) for key, v in acc.items()}


def _durations(timeline: list[tuple]) -> dict[tuple[str, int, int], float]:
    """One rank's step: each executed action's duration by (kind, stage, chunk), Bs with a W marked I."""
    weights = {(s, c) for k, s, c, _, _ in timeline if k == "W"}
    return {("I" if k == "B" and (s, c) in weights else k, s, c): t1 - t0 for k, s, c, t0, t1 in timeline}


def _mean_kind(costs: dict[tuple[str, int], float], kind: str, skip_first: bool = False) -> float:
    vals = [v for (k, s), v in costs.items() if k == kind and not (skip_first and s == 0)]
    return statistics.mean(vals) if vals else 0.0


def _summarise(kind: str, chunks: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One PP 2 case from both ranks' results: bubble, step time, F/B/I/W, formula, simulation, memory."""
    from dsk_parallel.pipeline import step_bubble  # the bubble's definition, shared with dsk profile

    n = len(ranks[0]["records"])
    bubbles, spans, steps = [], [], []
    per_rank: list[list[float]] = [[] for _ in ranks]
    for i in range(n):
        recs = [r["records"][i] for r in ranks]
        span, _, fr = step_bubble([rec["span"] for rec in recs], [rec["timeline"] for rec in recs])
        for q, f in enumerate(fr):
            per_rank[q].append(f)
        bubbles.append(statistics.mean(fr))
        spans.append(span)
        steps.append(max(rec["step_s"] for rec in recs))
    timelines = [rec["timeline"] for r in ranks for rec in r["records"]]
    costs = _costs(timelines)
    F, B = _mean_kind(costs, "F"), _mean_kind(costs, "B")
    Bi, W = _mean_kind(costs, "I", skip_first=True), _mean_kind(costs, "W", skip_first=True)
    span = statistics.median(spans)
    lists = action_lists(kind, PP, chunks)
    order_ok = all(
        [(k, s, c) for k, _, s, c in lists[q]] == _executed(rec["timeline"], lists[q])
        for q, r in enumerate(ranks)
        for rec in r["records"]
    )
    sim_spans, sim_bubbles = [], []
    for i in range(n):  # each step re-run with its own actions' measured durations, communication free
        dur = [_durations(r["records"][i]["timeline"]) for r in ranks]
        sim_span, sim_busy = simulate(lists, n_stages(kind, PP), lambda q, a, _d=dur: _d[q][(a[0], a[2], a[3])])
        sim_spans.append(sim_span)
        sim_bubbles.append(statistics.mean((sim_span - b) / sim_span for b in sim_busy.values()))
    mem = [r["memory"] for r in ranks]
    return {
        "kind": kind, "chunks": chunks, "bubble": statistics.median(bubbles),
        "bubble_per_rank": [statistics.median(v) for v in per_rank], "span_s": span,
        "step_s": statistics.median(steps), "F": F, "B": B, "I": Bi, "W": W, "costs": costs,
        "formula_s": formula_bubble(kind, PP, F, B, W), "formula": formula_bubble(kind, PP, F, B, W) / span,
        "sim_bubble": statistics.median(sim_bubbles), "sim_span_s": statistics.median(sim_spans), "order_ok": order_ok, "memory": mem, "steps": n,
    }  # fmt: skip


def cost_model(costs: dict[tuple[str, int], float]) -> Callable[[str, int, int, int], float]:
    """``cost(kind, stage, stages, layers)`` from the per-stage means of ``dualpipev`` at PP 2 (four 2-layer stages):
    ``layers`` x the per-layer cost of the middle stages (1, 2), plus the first stage's extra (embedding, dense
    layer 0) or the last's (norm, head, MTP, loss). A first stage's I computes nothing and its W is its whole
    backward (as torch's and dsk's zero-bubble backward do); its I keeps the measured one."""
    per_layer = {k: (costs[(k, 1)] + costs[(k, 2)]) / 4 for k in "FBIW"}
    extra_first = {k: costs[("F" if k == "F" else "B", 0)] - 2 * per_layer["F" if k == "F" else "B"] for k in "FB"}
    extra_last = {k: costs[(k, 3)] - 2 * per_layer[k] for k in "FBIW"}

    def cost(kind: str, stage: int, stages: int, layers: int) -> float:
        if stage == 0:
            if kind == "I":
                return costs[("I", 0)]
            k = "F" if kind == "F" else "B"  # a first stage's W is its whole backward
            return max(0.0, layers * per_layer[k] + extra_first[k])
        extra = extra_last[kind] if stage == stages - 1 else 0.0
        return max(0.0, layers * per_layer[kind] + extra)

    return cost


def simulate_pp4(kind: str, chunks: int, costs: dict[tuple[str, int], float], pp: int = 4) -> dict[str, Any]:
    """The simulated PP ``pp`` step of ``kind``: its bubble, span, and the formula with the same costs."""
    stages = n_stages(kind, pp)
    layers = LAYERS // stages
    model = cost_model(costs)
    lists = action_lists(kind, pp, chunks)
    span, busy = simulate(lists, stages, lambda q, a: model(a[0], a[2], stages, layers))
    F = statistics.mean(model("F", s, stages, layers) for s in range(stages))
    B = statistics.mean(model("B", s, stages, layers) for s in range(stages))
    W = statistics.mean(model("W", s, stages, layers) for s in range(1, stages))
    bubble_s = formula_bubble(kind, pp, F, B, W)
    # the same lists with every stage alike (the formula's premise): F and B the stages' means, I and W those of
    # the stages that have an input gradient
    even = {"F": F, "B": B, "W": W, "I": statistics.mean(model("I", s, stages, layers) for s in range(1, stages))}
    even_span, even_busy = simulate(lists, stages, lambda q, a: even[a[0]])
    return {
        "kind": kind, "chunks": chunks, "pp": pp, "stages": stages, "layers_per_stage": layers,
        "bubble": statistics.mean((span - b) / span for b in busy.values()),
        "bubble_per_rank": [(span - busy[r]) / span for r in sorted(busy)], "span_s": span,
        "F": F, "B": B, "W": W, "I": even["I"], "formula_s": bubble_s, "formula": bubble_s / span,
        "even_bubble": statistics.mean((even_span - b) / even_span for b in even_busy.values()),
        "even_span_s": even_span, "even_formula": bubble_s / even_span,
    }  # fmt: skip


def _memory_rows(case: dict[str, Any]) -> dict[str, Any]:
    """Per-rank parameter and activation memory of a PP 2 case."""
    mem = case["memory"]
    units = []
    for m in mem:
        unit = statistics.mean(m["chunk_bytes"].values()) if m["chunk_bytes"] else 0.0
        units.append(m["peak"] / unit if unit else 0.0)
    return {
        "peak_bytes": [m["peak"] for m in mem],
        "unit_bytes": [statistics.mean(m["chunk_bytes"].values()) for m in mem],
        "units": units,
        "residual_bytes": [m["residual"] for m in mem],
        "param_bytes": [sum(m["param_parts"].values()) for m in mem],
        "grad_state_bytes": [m["grad_bytes"] + m["state_bytes"] for m in mem],
    }


# -- the benchmark -------------------------------------------------------------------------------------------------
def _prebuild_kernels() -> None:
    """Build the C++ kernels here first: a rank compiling one in its first step (about a minute) would leave the
    other waiting past gloo's timeout."""
    import importlib

    for module in ("dsk.model.norm", "dsk_mla.kernels", "dsk_moe.kernels"):
        try:
            importlib.import_module(module).EXTENSION.load()
        except Exception as exc:  # noqa: BLE001 - a kernel is an optimisation; the ranks fall back the same way
            print(f"[bench pipeline] {module}: {exc!r}", file=sys.stderr)


def measure(quick: bool) -> dict[str, Any]:
    """Run the PP 2 cases on two gloo ranks and compute the PP 4 simulations; the raw summaries."""
    _prebuild_kernels()
    if quick:
        cases = [(k, 4) for k in KINDS]
        warmup, steps = 2, 3
    else:
        cases = [(k, c) for c in (4, 8) for k in KINDS] + [("dualpipev", 16)]
        warmup, steps = 3, 11
    t0 = time.time()
    per_rank = _spawn(PP, cases, warmup, steps)
    wall = time.time() - t0
    pp2 = [_summarise(k, c, [r[i] for r in per_rank]) for i, (k, c) in enumerate(cases)]
    model_bytes = {}
    for case in pp2:
        for m in case["memory"]:
            model_bytes.update(m["param_parts"])
    pp4 = []
    if not quick:
        source = {c["chunks"]: c["costs"] for c in pp2 if c["kind"] == "dualpipev"}
        for chunks in (8, 16):
            for k in KINDS:
                pp4.append(simulate_pp4(k, chunks, source[chunks]))
    return {"pp2": pp2, "pp4": pp4, "model_param_bytes": sum(model_bytes.values()), "wall_s": wall,
            "warmup": warmup, "steps": steps}  # fmt: skip


def _label(kind: str) -> str:
    return "dualpipe (zero_bubble)" if kind == "dualpipe" else kind


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The bench rows of :func:`measure`'s result."""
    rows = []
    load = os.getloadavg()[0]
    base = {c["chunks"]: c["step_s"] for c in result["pp2"] if c["kind"] == "1f1b"}
    common = f"recipes/dualpipe.toml model B{BATCH}x{SEQ} fp32 AdamW, gloo, 1 thread/rank"
    for c in result["pp2"]:
        name = f"pp=2 {_label(c['kind'])} chunks={c['chunks']}"
        rows.append({
            "bench": "pipeline_bubble", "case": f"{name}: measured (idle / span) vs §3.8 formula, {common}",
            "dsk": c["bubble"], "peer": c["formula"], "ratio": None, "unit": "fraction of span",
            "target": "measured near formula (+ P2P and bookkeeping)", "bubble_per_rank": c["bubble_per_rank"],
            "sim_bubble": c["sim_bubble"], "span_s": c["span_s"], "F_s": c["F"], "B_s": c["B"], "I_s": c["I"],
            "W_s": c["W"], "order_ok": c["order_ok"], "load_avg_1min": load,
        })  # fmt: skip
        peer = base.get(c["chunks"])
        rows.append({
            "bench": "pipeline_step", "case": f"{name}: step time vs 1f1b at the same chunks, {common}",
            "dsk": c["step_s"], "peer": peer, "ratio": peer / c["step_s"] if peer else None, "unit": "s/step",
            "target": "ratio > 1: faster than 1F1B",
        })  # fmt: skip
    base4 = {c["chunks"]: c["span_s"] for c in result["pp4"] if c["kind"] == "1f1b"}
    for c in result["pp4"]:
        name = f"pp=4 {_label(c['kind'])} chunks={c['chunks']} (simulated from the action lists and PP 2 costs)"
        rows.append({
            "bench": "pipeline_pp4_bubble", "case": f"{name}: bubble vs §3.8 formula", "dsk": c["bubble"],
            "peer": c["formula"], "ratio": None, "unit": "fraction of span", "target": "computed, not run",
            "bubble_per_rank": c["bubble_per_rank"], "even_bubble": c["even_bubble"], "even_formula": c["even_formula"],
        })  # fmt: skip
        peer = base4[c["chunks"]]
        rows.append({
            "bench": "pipeline_pp4_step", "case": f"{name}: compute span vs 1f1b", "dsk": c["span_s"], "peer": peer,
            "ratio": peer / c["span_s"], "unit": "s/step", "target": "ratio > 1: faster than 1F1B",
        })  # fmt: skip
    share = result["model_param_bytes"] / PP
    for c in result["pp2"]:
        m = _memory_rows(c)
        name = f"pp=2 {_label(c['kind'])} chunks={c['chunks']}"
        units = max(m["units"])
        want = formula_activations(c["kind"], PP)
        rows.append({
            "bench": "pipeline_activations", "case": f"{name}: peak saved activations (largest rank) in chunk-stages",
            "dsk": units, "peer": float(want), "ratio": want / units if units else None, "unit": "chunk-stages",
            "target": "PP (1F1B), PP+1 (DualPipe, DualPipeV)", **m,
        })  # fmt: skip
        total = max(4 * p for p in m["param_bytes"])
        rows.append({
            "bench": "pipeline_params", "case": f"{name}: params + grads + AdamW per rank (largest) vs model / ranks",
            "dsk": float(total), "peer": 4 * share, "ratio": total / (4 * share), "unit": "bytes",
            "target": "1F1B ~1x, DualPipe 2x, DualPipeV ~1x (ratio = multiple)",
            "param_bytes": m["param_bytes"], "grad_state_bytes": m["grad_state_bytes"],
        })  # fmt: skip
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows of ``python -m bench pipeline`` (see the module docstring); quick: PP 2 at 4 chunks, fewer steps."""
    return rows_of(measure(quick))


# -- the report ----------------------------------------------------------------------------------------------------
def _ms(x: float) -> str:
    return f"{1e3 * x:7.1f}"


def _kb(x: float) -> str:
    return f"{x / 1024:8.1f}"


def report(result: dict[str, Any]) -> str:
    """The tables of a full run, as text."""
    out = []
    out.append(
        f"PP 2, measured ({result['warmup']} warm-up + {result['steps']} traced steps per case, the cases interleaved "
        "step by step; medians; step and span in ms per step, F B I W in ms per chunk; bubble = fraction of the "
        "schedule's span)"
    )
    out.append(
        f"{'schedule':24s} {'chunks':>6s} {'step':>7s} {'span':>7s} {'F':>7s} {'B':>7s} {'I':>7s} {'W':>7s} "
        f"{'bubble':>7s} {'per rank':>13s} {'formula':>8s} {'sim':>6s} {'sim span':>8s} order"
    )
    for c in result["pp2"]:
        out.append(
            f"{_label(c['kind']):24s} {c['chunks']:6d} {_ms(c['step_s'])} {_ms(c['span_s'])} {_ms(c['F'])} "
            f"{_ms(c['B'])} {_ms(c['I'])} {_ms(c['W'])} {c['bubble']:7.3f} "
            f"{' '.join(f'{b:.3f}' for b in c['bubble_per_rank']):>13s} {c['formula']:8.3f} {c['sim_bubble']:6.3f} "
            f"{_ms(c['sim_span_s'])}  {'ok' if c['order_ok'] else 'DIFFERS'}"
        )
    out.append("")
    out.append(
        "PP 2 measured median cost per chunk by model stage (ms; I = input-gradient-only B, W = its weight step)"
    )
    for c in result["pp2"]:
        stages = sorted({s for _, s in c["costs"]})
        cells = [
            f"s{s} " + " ".join(f"{k}={1e3 * c['costs'][(k, s)]:.1f}" for k in "FBIW" if (k, s) in c["costs"])
            for s in stages
        ]
        out.append(f"{_label(c['kind']):24s} {c['chunks']:6d}  " + " | ".join(cells))
    if result["pp4"]:
        out.append("")
        out.append(
            "PP 4, computed from the executed action lists and the measured cost of each action (dualpipev's PP 2 "
            "per-stage costs at the same rows per chunk, scaled by the stage's layers; communication free; "
            "F B I W: the stages' means; even: the same lists with every stage costing those means)"
        )
        out.append(
            f"{'schedule':24s} {'chunks':>6s} {'stages':>6s} {'layers':>6s} {'span':>7s} {'F':>7s} {'B':>7s} "
            f"{'I':>7s} {'W':>7s} {'bubble':>7s} {'per rank':>27s} {'formula':>8s} | {'even':>6s} {'span':>7s} "
            f"{'formula':>8s}"
        )
        for c in result["pp4"]:
            out.append(
                f"{_label(c['kind']):24s} {c['chunks']:6d} {c['stages']:6d} {c['layers_per_stage']:6d} "
                f"{_ms(c['span_s'])} {_ms(c['F'])} {_ms(c['B'])} {_ms(c['I'])} {_ms(c['W'])} {c['bubble']:7.3f} "
                f"{' '.join(f'{b:.3f}' for b in c['bubble_per_rank']):>27s} {c['formula']:8.3f} | "
                f"{c['even_bubble']:6.3f} {_ms(c['even_span_s'])} {c['even_formula']:8.3f}"
            )
    out.append("")
    out.append(
        "PP 2 memory per rank (KiB). params: the rank's parameters (x4 with grads + AdamW; measured grads + state "
        f"after a step); model / 2 = {_kb(result['model_param_bytes'] / PP).strip()} KiB. activations: peak bytes "
        "saved for backward; unit = one chunk's forward of one of the rank's stages; units = peak / unit"
    )
    out.append(
        f"{'schedule':24s} {'chunks':>6s} {'params r0,r1':>19s} {'x share':>8s} {'grad+state r0,r1':>19s} "
        f"{'peak r0,r1':>19s} {'unit r0,r1':>19s} {'units r0,r1':>13s} {'formula':>7s} {'left after step r0,r1':>21s}"
    )
    share = result["model_param_bytes"] / PP
    for c in result["pp2"]:
        m = _memory_rows(c)
        out.append(
            f"{_label(c['kind']):24s} {c['chunks']:6d} {','.join(_kb(b) for b in m['param_bytes']):>19s} "
            f"{max(m['param_bytes']) / share:8.2f} {','.join(_kb(b) for b in m['grad_state_bytes']):>19s} "
            f"{','.join(_kb(b) for b in m['peak_bytes']):>19s} {','.join(_kb(b) for b in m['unit_bytes']):>19s} "
            f"{','.join(f'{u:6.2f}' for u in m['units']):>13s} {formula_activations(c['kind'], PP):7d} "
            f"{','.join(_kb(b) for b in m['residual_bytes']):>21s}"
        )
    return "\n".join(out)


def main() -> None:
    import platform

    import torch

    quick = "--quick" in sys.argv
    print(f"$ .venv/bin/python -m bench.bench_pipeline{' --quick' if quick else ''}")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start"
    )
    result = measure(quick)
    print(report(result))
    print(f"# the PP 2 runs took {result['wall_s']:.0f} s (load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
