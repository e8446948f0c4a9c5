"""Pipeline parallelism: the model cut into stages over ranks, run by 1F1B, DualPipeV or DualPipe.

``[parallel.<key>] type = "1f1b" | "dualpipev" | "dualpipe"`` (config: :mod:`dsk_parallel.pipeline_config`).

Layout. World = PP x DP, pipeline outermost: rank = pp_rank * DP + dp_rank. The data and expert strategies of the
run work inside one pipeline rank's DP ranks (:mod:`dsk_parallel.layout`), so the expert-parallel group sits
inside the data-parallel ranks of a stage, consecutive ranks, as DeepSeek-V3 lays them out.

Stages. The model's parts in order (embedding, layers, final norm, head, MTP heads) are cut into S model stages
(:func:`dsk.api.runtime.split_layers`): S = PP for ``1f1b`` and ``dualpipe``, 2 PP for ``dualpipev``. A rank keeps
only the parts of its stages; every other part of the model is replaced by an empty placeholder, so parameters,
gradients and optimizer state are those of its stages only:

- ``1f1b`` (torch's ``Schedule1F1B``): stage r on rank r;
- ``dualpipev`` (torch's ``ScheduleDualPipeV``): stages r and 2 PP - 1 - r on rank r, so the first and the last
  stage, the embedding and the output head and MTP heads that share it, are all on rank 0;
- ``dualpipe`` (:mod:`dsk_parallel.dualpipe`, written on torch.distributed P2P, as torch has no bidirectional
  schedule): rank r holds stage r for micro-batches entering at rank 0 and stage PP - 1 - r for those entering at
  rank PP - 1; every stage lives on two ranks (2x parameters), and the two copies' gradients are summed.

A part that more than one pipeline rank holds (the embedding, which the MTP heads on the last stage read, on the
first and last ranks of ``1f1b``; every part under ``dualpipe``) has its gradients summed over the ranks that hold
it and so stays identical on all of them; a MoE layer's expert loads are summed the same way, so both copies move
their router bias alike.

A step. Each trainer micro-batch is cut into ``chunks`` along its rows; the stage runners look up each chunk's
input ids, mask and labels by counting their forwards (every schedule runs a stage's chunks in order). The last
stage returns the chunk's loss (the trainer's ``loss_fn`` plus that stage's auxiliary losses); other stages attach
their own auxiliary losses to the activations they send (:class:`_AttachAux`), so each stage's MoE balance loss is
back-propagated on its own rank. The loss parts are summed over the pipeline ranks, so every rank reports the step's
loss. Gradients are never rescaled by the schedule: the trainer's weights already make each chunk's share.

Overlap. On gloo/CPU nothing overlaps: one thread computes, and each schedule waits for its P2P requests before the
next compute. torch's schedules post the sends of one action with the receives of the next; DualPipe commits the
P2P of an overlapped F&B pair together. On NCCL the sends and receives run on NCCL's own streams, so communication
overlaps compute; overlapping one chunk's forward with another's backward inside a pair (DeepSeek-V3's Fig. 4)
needs an ``overlapped_forward_backward`` with CUDA streams, which dsk does not have.

Profiling (:class:`dsk.api.Profiled`). ``profile_start`` aligns the pipeline ranks on a barrier (the common time
origin) and turns the timeline on; each step's span and executed compute actions are recorded until
``profile_report``, which gathers every pipeline rank's to every rank and gives the timeline and each rank's bubble
(:func:`step_bubble`, the definition ``bench/bench_pipeline.py`` measures with).

Evaluation and checkpoints. The checkpoint is the one-process format: the writer gathers every pipeline rank's
parts (:meth:`Pipeline.model_state_dict`; in a chain with the data and expert strategies, :meth:`gather_tensors`
last), and a resumed rank keeps the entries of its parts (:meth:`shard_tensors` first). Evaluation runs on a
one-process copy on the writer (``holds_part_of_model``).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsk.api import SHARDED_PARAM
from dsk.api.runtime import (
    RunSetupError,
    collect_side_channels,
    load_model_weights,
    load_optimizer_state,
    model_state_for_saving,
    optimizer_state_to_tensors,
    profile_part,
    split_layers,
)
from dsk_parallel.layout import RankLayout, local_rank
from dsk_parallel.pipeline_config import STAGES_PER_RANK, min_chunks, pipeline_problems

__all__ = ["DualPipe", "DualPipeV", "OneFOneB", "Pipeline", "part_of", "step_bubble"]

#: the loss parts a step reports, in the order they are all-reduced
_PARTS = ("loss", "lm_loss", "mtp_loss", "aux_loss")


def part_of(name: str) -> str:
    """The model part a parameter, buffer or optimizer-state key belongs to: ``layers.<i>`` for a transformer
    layer, else its first component (``embed_tokens``, ``norm``, ``lm_head``, ``mtp``)."""
    head, _, rest = name.partition(".")
    if head == "layers":
        return f"layers.{rest.partition('.')[0]}"
    return head


def step_bubble(
    spans: list[tuple[float, float]], timelines: list[list[tuple]]
) -> tuple[float, list[float], list[float]]:
    """One step's bubble: ``(span, busy per rank, idle fraction per rank)``.

    ``spans[q]`` is rank q's ``(start, end)`` of the step's schedule and ``timelines[q]`` its executed compute
    actions, tuples ending in ``(..., t_start, t_end)``, on a clock the ranks share. The span runs from the first
    rank's start to the last rank's end; a rank's idle fraction is ``(span - busy) / span`` with busy the sum of
    its actions' durations: everything but compute counts as idle (waiting, P2P, the schedule's bookkeeping).
    """
    span = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
    busy = [sum(t1 - t0 for *_, t0, t1 in timeline) for timeline in timelines]
    return span, busy, [(span - b) / span for b in busy]


class _Elsewhere(nn.Module):
    """A placeholder for a part of the model another pipeline rank holds (no parameters, never called)."""

    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.part} lives on another pipeline rank")

    def extra_repr(self) -> str:
        return f"{self.part} on another pipeline rank"


class _AttachAux(torch.autograd.Function):
    """``h`` unchanged, with ``aux`` (a weighted scalar loss) joined to its graph: the backward of ``h`` also
    back-propagates ``aux`` with gradient 1, as if it had been added to the final loss."""

    @staticmethod
    def forward(ctx, h, aux):  # type: ignore[override]
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return h.clone()  # a stage output is sent, so it must not be a view

    @staticmethod
    def backward(ctx, grad_h):  # type: ignore[override]
        shape, dtype, device = ctx.aux_meta
        return grad_h, torch.ones(shape, dtype=dtype, device=device)


class _StageRunner(nn.Module):
    """One model stage as a pipeline schedule calls it: ``y = runner(x)`` per chunk, in chunk order.

    ``x`` is the chunk's input ids on the first stage and the received hidden states elsewhere. The chunk's side
    data (ids, mask, labels, auxiliary-loss weight) come from :attr:`feed` by counting calls. The last stage
    returns the chunk's scalar loss; the others return hidden states with this stage's auxiliary losses attached.
    """

    def __init__(self, stage: nn.Module, index: int):
        super().__init__()
        self.stage = stage
        self.index = index
        self.first, self.last = stage.first, stage.last
        self.aux_sources = [m for _, m in collect_side_channels(stage).aux]
        self.feed: list[dict[str, Any]] = []
        self.calls = 0
        self.loss_fn: Callable[..., Any] | None = None
        self.parts: dict[str, torch.Tensor] = {}

    def start(self, feed: list[dict[str, Any]], loss_fn: Callable[..., Any]) -> None:
        self.feed, self.calls, self.loss_fn, self.parts = feed, 0, loss_fn, {}

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.parts[key] = self.parts[key] + value if key in self.parts else value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.feed[self.calls]
        self.calls += 1
        ids = chunk["input_ids"]
        pos = torch.arange(ids.shape[1], device=ids.device)
        out = self.stage(x, ids, pos, chunk.get("mask"))
        aux = None
        losses = [a for a in (m.aux_loss() for m in self.aux_sources) if a is not None]
        if losses and torch.is_grad_enabled():
            # in the losses' dtype, at least float32 (as BuiltRun.forward_backward adds them): a float32 product
            # would round the chunk's weight (1/3, 1/6, ...) in the gradient of every balance loss
            dtype = torch.promote_types(losses[0].dtype, torch.float32)
            aux = torch.stack([a.to(dtype) for a in losses]).sum() * chunk["aux_weight"]
            self._add("aux_loss", aux)
            self._add("loss", aux)
        if self.last:
            loss, shares = self.loss_fn(out, chunk)
            for key, value in shares.items():
                self._add(key, value)
            self._add("loss", loss)
            return loss + aux.to(loss.dtype) if aux is not None else loss
        return _AttachAux.apply(out, aux) if aux is not None else out


def _chunks(batch: dict[str, Any], n: int, aux_weight: float) -> list[dict[str, Any]]:
    """``batch`` cut into ``n`` chunks along the rows (torch.tensor_split, as torch's schedules cut the first
    stage's input), each with its share of the auxiliary-loss weight."""
    rows = batch["input_ids"].shape[0]
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            for i, part in enumerate(torch.tensor_split(value, n)):
                out[i][key] = part
        else:
            for i in range(n):
                out[i][key] = value
    for chunk in out:
        chunk["aux_weight"] = aux_weight * chunk["input_ids"].shape[0] / rows
    return out


class Pipeline(RankLayout, abc.ABC):
    """The pipeline strategy (module docstring); the subclasses set the schedule."""

    kind = ""
    wrap_order = -20  # cut first (the expert and data strategies then see this rank's parts only), gather last
    holds_part_of_model = True
    clips_for_all = True

    def __init__(self, config: Any = None):
        super().__init__(config)
        self.mesh: Any = None
        self.pp_group: Any = None
        self.runners: list[_StageRunner] = []
        self.local_parts: set[str] = set()
        self.part_owners: dict[str, tuple[int, ...]] = {}
        self.full_names: list[str] = []  # the whole model's parameter names, in the one-process order
        self.full_keys: set[str] = set()  # and its state-dict keys
        self.full_groups: list[list[str]] = []  # the one-process optimizer's groups (parameter names)
        self._shared: list[tuple[tuple[int, ...], Any]] = []  # (pp ranks holding some parts, their group)
        self._schedules: dict[Any, Any] = {}
        self._model: nn.Module | None = None
        self._copies_of: dict[int, int] | None = None  # id(parameter) -> ranks holding its gradient (clip)
        self._stats_of: dict[Any, set[int]] | None = None  # holders -> ids of their parts' step statistics
        self.ep = 1
        #: the benchmark sets it: each executed compute action goes into :attr:`timeline` as
        #: ``(kind "F" | "B" | "W", model stage, chunk, t_start, t_end)`` (perf_counter seconds)
        self.trace = False
        self.timeline: list[tuple[str, int, int, float, float]] = []
        # dsk profile: on between profile_start and profile_report; each step's (first timeline index, t0, t1)
        self._profiling = False
        self._profile_steps: list[tuple[int, float, float]] = []
        self._origin = 0.0

    # -- process layout ----------------------------------------------------------------------------------------
    @property
    def key(self) -> str:
        return f"parallel.{self.name}"

    def setup(self, run: Any) -> None:
        """The (pp, dp) DeviceMesh on the default group; refuses a world that is not pp x DP."""
        from torch.distributed.device_mesh import init_device_mesh

        cfg = self.config
        if not dist.is_available() or not dist.is_initialized():
            raise RunSetupError(
                f'{self.key} (type = "{self.kind}") needs torch.distributed ranks: run with --nproc (pp = '
                f"{cfg.pp or 'the process count'}), or set {self.key}.enabled = false for one process"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        pp = cfg.pp if cfg.pp is not None else world
        if world % pp:
            raise RunSetupError(
                f"{self.key}.pp = {pp} does not divide the {world} processes: the world is pp x the data-parallel "
                f"ranks; run with --nproc {pp * max(1, world // pp)} or set {self.key}.pp"
            )
        dp = world // pp
        others = [
            k for k, slot in ((run.section("parallel") if run is not None else None) or {}).items()
            if k != self.name and not _is_pipeline(slot)
        ]  # fmt: skip
        if dp > 1 and not others:
            raise RunSetupError(
                f"{world} processes at {self.key}.pp = {pp} leave {dp} data-parallel ranks, and the recipe has no "
                f'data-parallel table for them: add [parallel.data] type = "zero1" (or "replicate"), or set '
                f"{self.key}.pp = {world}"
            )
        problems = pipeline_problems(self.kind, self.name, pp, cfg.chunks, cfg.layers_per_stage, None)
        if problems:
            raise RunSetupError("; ".join(m for _, m in problems))
        self._rank, self._world = rank, world
        self._cuda = torch.cuda.is_available() and "nccl" in str(dist.get_backend()).lower()
        if self._cuda:
            torch.cuda.set_device(local_rank())
        self.pp, self.dp = pp, dp
        self.pp_rank, self.dp_rank = rank // dp, rank % dp
        self.chunks = cfg.chunks if cfg.chunks is not None else min_chunks(self.kind, pp)
        self.mesh = init_device_mesh("cuda" if self._cuda else "cpu", (pp, dp), mesh_dim_names=("pp", "dp"))
        self.pp_group = self.mesh["pp"].get_group()
        self.dp_group = self.mesh["dp"].get_group()
        for slot in ((run.section("parallel") if run is not None else None) or {}).values():
            ep = getattr(getattr(slot, "config", None), "ep", None)
            if getattr(slot, "name", None) == "node_limited":
                self.ep = ep if ep is not None else dp
        batch = getattr(getattr(run.section("trainer"), "config", None), "batch_size", None) if run else None
        if batch is not None and batch % self.chunks:
            raise RunSetupError(
                f"trainer.batch_size = {batch} rows per data rank do not cut into {self.key}.chunks = {self.chunks} "
                "equal chunks (the stages exchange activations of one shape); make batch_size a multiple of chunks"
            )

    @property
    def data_rank(self) -> int:
        return self.dp_rank

    @property
    def data_world_size(self) -> int:
        return self.dp

    def global_rank(self, pp_rank: int, dp_rank: int | None = None) -> int:
        """The global rank of pipeline rank ``pp_rank`` in data-parallel slice ``dp_rank`` (default: this one's)."""
        return pp_rank * self.dp + (self.dp_rank if dp_rank is None else dp_rank)

    # -- which stages where ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def local_stages(self, pp_rank: int) -> list[int]:
        """The model stages pipeline rank ``pp_rank`` runs, in the order the schedule takes them."""

    def n_stages(self) -> int:
        return self.pp * STAGES_PER_RANK[self.kind]

    def _parts_of_stage(self, model: nn.Module, spans: list[tuple[int, int]], s: int) -> set[str]:
        start, end = spans[s]
        parts = {f"layers.{i}" for i in range(start, end)}
        last = s == len(spans) - 1
        if s == 0:
            parts.add("embed_tokens")
        if last:
            parts |= {"norm", "lm_head"}
            if getattr(model, "mtp", None) is not None:
                parts |= {"mtp", "embed_tokens"}  # the MTP heads embed the shifted tokens with the shared table
            if getattr(model.config, "tie_embeddings", False):
                parts.add("embed_tokens")
        return parts

    # -- the model ---------------------------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module, run: Any) -> nn.Module:
        """Cut ``model`` into stages, keep this rank's, replace the other parts with placeholders (in place)."""
        cfg = self.config
        n_layers = len(model.layers)
        problems = pipeline_problems(self.kind, self.name, self.pp, cfg.chunks, cfg.layers_per_stage, n_layers)
        if problems:
            raise RunSetupError("; ".join(m for _, m in problems))
        spans = split_layers(n_layers, self.n_stages(), cfg.layers_per_stage)
        self.full_names = [n for n, p in model.named_parameters() if p.requires_grad]
        slot = run.section("optimizer") if run is not None else None
        # the groups [optimizer] makes of the uncut model (no state yet): a checkpoint's skeleton is one process's
        self.full_groups = (
            [list(g["names"]) for g in slot.build(model).param_groups] if slot is not None else [self.full_names]
        )
        self.full_keys = set(model_state_for_saving(model))
        owners: dict[str, set[int]] = {}
        for q in range(self.pp):
            for s in self.local_stages(q):
                for part in self._parts_of_stage(model, spans, s):
                    owners.setdefault(part, set()).add(q)
        self.part_owners = {part: tuple(sorted(qs)) for part, qs in owners.items()}
        self.local_parts = {p for p, qs in self.part_owners.items() if self.pp_rank in qs}
        self.runners = []
        for s in self.local_stages(self.pp_rank):
            start, end = spans[s]
            stage = model.stage(start, end, first=s == 0, last=s == len(spans) - 1)
            self.runners.append(_StageRunner(stage, s))
        # every other part goes: this rank keeps (and trains) its stages only
        for i in range(n_layers):
            if f"layers.{i}" not in self.local_parts:
                model.layers[i] = _Elsewhere(f"layers.{i}")
        for part in ("embed_tokens", "norm", "lm_head", "mtp"):
            if getattr(model, part, None) is not None and part not in self.local_parts:
                setattr(model, part, _Elsewhere(part))
        # parts several pipeline ranks hold: a group per (ranks holding them, data-parallel slice); every rank
        # makes every group, in the same order
        self._shared = []
        for qs in sorted({qs for qs in self.part_owners.values() if len(qs) > 1}):
            for d in range(self.dp):
                group = dist.new_group([self.global_rank(q, d) for q in qs])
                if d == self.dp_rank and self.pp_rank in qs:
                    self._shared.append((qs, group))
        self._model = model
        self._broadcast_shared(model)
        return model

    def _shared_params(self, model: nn.Module, qs: tuple[int, ...]) -> list[torch.Tensor]:
        """This rank's parameters (and step-statistics buffers, with ``buffers``) of the parts ``qs`` hold."""
        return [p for n, p in model.named_parameters() if self.part_owners.get(part_of(n)) == qs]

    def _broadcast_shared(self, model: nn.Module) -> None:
        """The lowest holder's values of every shared part on all its holders (they are seeded alike; make sure)."""
        for qs, group in self._shared:
            src = self.global_rank(qs[0])
            tensors = [t for n, t in model.state_dict().items() if self.part_owners.get(part_of(n)) == qs]
            for t in tensors:
                dist.broadcast(t, src=src, group=group)

    # -- the step ----------------------------------------------------------------------------------------------
    def forward_backward(
        self, run: Any, batches: list[dict[str, Any]], loss_fn: Any, aux_weight: float
    ) -> dict[str, torch.Tensor]:
        """Each micro-batch through the schedule in ``chunks`` chunks; the loss parts summed over the pipeline."""
        device = batches[0]["input_ids"].device
        if self._profiling:
            first, t0 = len(self.timeline), self._now()
        for batch in batches:
            feed = _chunks(batch, self.chunks, aux_weight)
            # in dsk profile, the schedule's own time (waiting for the other ranks, and driving the actions) is
            # the part "pipeline idle"; the stages' compute is the model's parts, the P2P ops communication
            with profile_part("pipeline idle"):
                self.run_schedule(batch["input_ids"], feed, loss_fn)
        if self._profiling:
            self._profile_steps.append((first, t0, self._now()))
        sums = torch.zeros(2 * len(_PARTS), dtype=torch.float64)
        for runner in self.runners:
            for i, key in enumerate(_PARTS):
                if key in runner.parts:
                    sums[i] += float(runner.parts[key])
                    sums[len(_PARTS) + i] = 1.0
        if self.pp > 1:
            dist.all_reduce(sums, group=self.pp_group) if not self._cuda else self._all_reduce_cuda(sums)
        present = sums[len(_PARTS) :]
        return {key: sums[i].to(device=device, dtype=torch.float32) for i, key in enumerate(_PARTS) if present[i] > 0}

    def _all_reduce_cuda(self, t: torch.Tensor) -> None:
        work = t.to(f"cuda:{local_rank()}")
        dist.all_reduce(work, group=self.pp_group)
        t.copy_(work.cpu())

    @abc.abstractmethod
    def run_schedule(self, input_ids: torch.Tensor, feed: list[dict[str, Any]], loss_fn: Any) -> None:
        """One micro-batch's chunks (``feed``) through the schedule; the first stage reads ``input_ids``."""

    def _activation_dtype(self) -> torch.dtype:
        """The dtype of the hidden states between stages: the model's floating parameters' (autocast computes in
        BF16 inside the blocks, but the residual stream stays in the parameters' dtype)."""
        return next(p.dtype for p in self._model.parameters() if p.is_floating_point())

    # -- dsk profile: the executed schedule and its bubble ---------------------------------------------------------
    def _now(self) -> float:
        """``time.perf_counter()``, after the GPU's queued work where the ranks compute on one (so that an action's
        end is when it ran, not when it was launched; only while tracing)."""
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def profile_start(self) -> None:
        """Clear the timeline, align the pipeline ranks on a barrier (the time origin) and record from now on;
        collective over the pipeline ranks."""
        self.timeline, self._profile_steps = [], []
        if self.pp > 1:
            dist.barrier(group=self.pp_group)
        self._origin = self._now()
        self.trace = self._profiling = True

    def profile_report(self) -> dict[str, Any]:
        """Every pipeline rank's executed schedule since :meth:`profile_start` and its bubble (then recording
        stops); collective over the pipeline ranks, and the same on each of them.

        Keys: ``schedule``, ``pp``, ``dp``, ``chunks``, ``steps`` (the measured steps); ``timeline``: one entry per
        executed compute action, ``{"rank" (pipeline rank), "kind", "stage" (model stage), "chunk", "step",
        "start", "end"}``, with times in seconds from the barrier that ends in :meth:`profile_start` on every
        rank (just before the first measured step) and kind ``F``, ``B`` or ``W`` as the schedule names them (a
        ``B`` followed by a ``W`` of the same stage and chunk computed the input gradient only); ``bubble``:
        per pipeline rank, its idle fraction :func:`step_bubble` of each measured step, averaged over the steps;
        ``busy_s``: per pipeline rank, its compute seconds per step (mean); ``span_s``: each measured step's span
        (first rank's start to last rank's end). A step's span is its schedule's (the micro-batches'
        ``run_schedule`` calls, without the loss all-reduce). Under data parallelism each pipeline replica reports
        its own (the writer's: replica 0). On GPUs every traced action is synchronised (its true duration).
        """
        self.trace = self._profiling = False
        origin, steps = self._origin, self._profile_steps
        bounds = [first for first, _, _ in steps] + [len(self.timeline)]
        mine = {
            "steps": [(t0 - origin, t1 - origin) for _, t0, t1 in steps],
            "actions": [
                [(k, stage, chunk, t0 - origin, t1 - origin) for k, stage, chunk, t0, t1 in self.timeline[a:b]]
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ],
        }
        self.timeline, self._profile_steps = [], []
        ranks: list[Any] = [mine]
        if self.pp > 1:
            ranks = [None] * self.pp
            dist.all_gather_object(ranks, mine, group=self.pp_group)
        n = min(len(r["steps"]) for r in ranks)
        timeline: list[dict[str, Any]] = []
        for q, r in enumerate(ranks):
            for i, actions in enumerate(r["actions"][:n]):
                for kind, stage, chunk, t0, t1 in actions:
                    timeline.append(
                        {"rank": q, "kind": kind, "stage": stage, "chunk": chunk, "step": i, "start": t0, "end": t1}
                    )  # fmt: skip
        span_s, busy, idle = [], [[] for _ in ranks], [[] for _ in ranks]
        for i in range(n):
            span, b, f = step_bubble([r["steps"][i] for r in ranks], [r["actions"][i] for r in ranks])
            span_s.append(span)
            for q in range(len(ranks)):
                busy[q].append(b[q])
                idle[q].append(f[q])
        return {
            "schedule": self.kind, "pp": self.pp, "dp": self.dp, "chunks": self.chunks, "steps": n,
            "timeline": timeline,
            "bubble": [sum(v) / n for v in idle] if n else [],
            "busy_s": [sum(v) / n for v in busy] if n else [],
            "span_s": span_s,
        }  # fmt: skip

    # -- gradients, norms, statistics ----------------------------------------------------------------------------
    def sync_gradients(self, model: nn.Module) -> None:
        """The gradients of the parts several pipeline ranks hold, summed over those ranks (each copy saw other
        chunks: the tied embedding of 1F1B's first and last stages, both copies of every DualPipe stage)."""
        for qs, group in self._shared:
            params = [p for p in self._shared_params(model, qs) if p.requires_grad]
            grads = []
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            if not grads:
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def _copies(self, name: str, p: torch.Tensor) -> int:
        """How many ranks of the world hold this exact gradient (after the strategies synced them)."""
        holders = len(self.part_owners.get(part_of(name), (self.pp_rank,)))
        if getattr(p, SHARDED_PARAM, False):
            return holders * max(1, self.dp // self.ep)  # an expert slice: one per EP group of the stage's DP ranks
        return holders * self.dp

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float, foreach: bool | None = None) -> torch.Tensor:
        """Clip by the whole model's gradient norm: each rank adds its gradients' squares divided by the number of
        ranks holding the same gradient (pipeline copies, data-parallel replicas, expert-slice replicas), summed
        over every rank."""
        if self._copies_of is None:  # the parameters are fixed once the run is built: look their names up once
            names = {id(p): n for n, p in self._model.named_parameters()} if self._model is not None else {}
            self._copies_of = {id(p): self._copies(names.get(id(p), ""), p) for p in params}
        grads = [p for p in params if p.grad is not None]
        dtype = torch.float64 if any(p.grad.dtype == torch.float64 for p in grads) else torch.float32
        device = grads[0].grad.device if grads else torch.device("cpu")
        sq = torch.zeros((), dtype=dtype, device=device)
        for p in grads:
            sq = sq + p.grad.detach().to(dtype).pow(2).sum() / self._copies_of[id(p)]
        if self._world > 1:
            dist.all_reduce(sq)
        total = sq.sqrt()
        if grads:
            torch.nn.utils.clip_grads_with_norm_([p for p in grads], max_norm, total, foreach=foreach)
        return total

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce over this pipeline rank's data-parallel ranks."""
        if self.dp == 1:
            return tensor
        work = tensor.to(f"cuda:{local_rank()}") if self._cuda and tensor.device.type != "cuda" else tensor
        dist.all_reduce(work, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.dp_group)
        if op == "mean":
            work.div_(self.dp)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        mark = torch.tensor(1.0 if flag else 0.0)
        if self._cuda:
            mark = mark.to(f"cuda:{local_rank()}")
        dist.all_reduce(mark, op=dist.ReduceOp.MAX)
        return float(mark) > 0

    def reduce_step_statistics(self, tensors: list[torch.Tensor]) -> None:
        """The router loads summed over the stage's data-parallel ranks and over the pipeline ranks holding the same
        layer (DualPipe's two copies each routed half of the chunks)."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        self.all_reduce(flat, "sum")
        self._scatter_back(tensors, flat)  # every load summed over the stage's data-parallel ranks first
        for qs, group in self._shared:  # then the shared layers' over the pipeline ranks holding them
            ids = self._shared_stats(qs)
            mine = [t for t in tensors if id(t) in ids]
            if mine:
                part = torch.cat([t.reshape(-1).to(torch.float64) for t in mine])
                dist.all_reduce(part, group=group)
                self._scatter_back(mine, part)

    def _shared_stats(self, qs: tuple[int, ...]) -> set[int]:
        """The ids of the step-statistics tensors of the parts the pipeline ranks ``qs`` hold (found once)."""
        if self._stats_of is None:
            side = collect_side_channels(self._model) if self._model is not None else None
            self._stats_of = {}
            for name, m in side.stats if side is not None else []:
                owners = self.part_owners.get(part_of(name))
                self._stats_of.setdefault(owners, set()).update(id(t) for t in m.step_stat_tensors())
        return self._stats_of.get(qs, set())

    @staticmethod
    def _scatter_back(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def merge_component_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Every pipeline rank's components' metrics (the writer reports all layers)."""
        if self.pp == 1:
            return metrics
        parts: list[Any] = [None] * self.pp
        dist.all_gather_object(parts, metrics, group=self.pp_group)
        merged: dict[str, Any] = {}
        for p in parts:
            for k, v in p.items():
                merged.setdefault(k, v)
        return merged

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self._world == 1:
            return obj
        box = [obj]
        device = torch.device(f"cuda:{local_rank()}") if self._cuda else None
        dist.broadcast_object_list(box, src=src, device=device)
        return box[0]

    def barrier(self) -> None:
        if self._world > 1:
            dist.barrier()

    def teardown(self) -> None:
        self._schedules.clear()
        self.mesh = None

    # -- checkpoints: the one-process format --------------------------------------------------------------------
    def _collect(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> Any:
        """Every pipeline rank's entries (of data-parallel slice 0) merged on the writer, the lowest pipeline
        rank's where several hold one; ``({}, {})``-like empties elsewhere (collective over slice 0's pipeline)."""
        if self.dp_rank != 0:
            return ({}, {}) if meta is not None else {}
        gathered: list[Any] = [None] * self.pp if self.pp_rank == 0 else None
        payload = (tensors, meta)
        if self.pp > 1:
            dist.gather_object(payload, gathered, dst=self.global_rank(0, 0), group=self.pp_group)
        else:
            gathered = [payload]
        if self.pp_rank != 0:
            return ({}, {}) if meta is not None else {}
        merged: dict[str, torch.Tensor] = {}
        for t, _ in gathered:
            for k, v in t.items():
                merged.setdefault(k, v)
        if meta is None:
            return merged
        return merged, self._merge_meta([m for _, m in gathered if m])

    def _merge_meta(self, metas: list[dict[str, Any]]) -> dict[str, Any]:
        """The ranks' optimizer skeletons as one process's: the whole model's groups (:attr:`full_groups`, what
        ``[optimizer]`` makes of the uncut model), each with the hyper-parameters of a rank's group holding its
        parameters."""
        if not metas:
            return {}
        hyper_of: dict[str, dict[str, Any]] = {}
        scalars: dict[str, Any] = {}
        for meta in metas:
            for g in meta.get("param_groups", []):
                hyper = {k: v for k, v in g.items() if k != "names"}
                for n in g["names"]:
                    hyper_of.setdefault(n, hyper)
            scalars.update(meta.get("scalars", {}))
        groups = []
        for names in self.full_groups:
            held = [n for n in names if n in hyper_of]
            if held:
                groups.append({**hyper_of[held[0]], "names": list(names)})
        return {**metas[0], "param_groups": groups, "scalars": scalars}

    def _keep_local(self, tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        unknown = sorted(k for k in tensors if part_of(k) not in self.part_owners)
        if unknown:
            raise RunSetupError(
                f"{where}: holds {unknown[:3]}, which are no part of this model; was the model changed since the "
                "checkpoint was written?"
            )
        return {k: v for k, v in tensors.items() if part_of(k) in self.local_parts}

    def _local_meta(self, meta: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """A whole-model optimizer skeleton cut to this rank's parameters (groups in the local optimizer's form)."""
        local = {n for g in optimizer.param_groups for n in g.get("names", [])}
        groups = [{**g, "names": [n for n in g["names"] if n in local]} for g in meta.get("param_groups", [])]
        if len(groups) != len(optimizer.param_groups):
            groups = [g for g in groups if g["names"]]
        scalars = {n: v for n, v in meta.get("scalars", {}).items() if n in local}
        return {**meta, "param_groups": groups, "scalars": scalars}

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self._collect(model_state_for_saving(model))

    def load_model_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], where: str) -> bool:
        local = self._keep_local(state, where)
        missing = sorted(self.full_keys - set(state))
        if missing:
            raise RunSetupError(f"{where}: weights do not match the model (missing {missing[:3]})")
        try:
            load_model_weights(model, local, where)
        except Exception as exc:  # CheckpointLoadError: names the tensors
            raise RunSetupError(str(exc)) from None
        return True

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = optimizer_state_to_tensors(optimizer)
        return self._collect(tensors, meta)

    def load_optimizer_state_dict(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        where: str,
    ) -> bool:
        try:
            load_optimizer_state(optimizer, self._keep_local(tensors, where), self._local_meta(meta, optimizer), where)
        except ValueError as exc:
            raise RunSetupError(str(exc)) from None
        return True

    # the chain with the data and expert strategies: they make this rank's state, the pipeline merges the ranks'
    def gather_tensors(self, tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return self._collect(tensors)

    def shard_tensors(self, tensors: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
        return self._keep_local(tensors, where)

    def gather_optimizer_meta(self, meta: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer skeleton of the whole model on the writer (collective, like :meth:`gather_tensors`)."""
        if not meta:
            meta = optimizer_state_to_tensors(optimizer)[1]
        return self._collect({}, meta)[1]

    def shard_optimizer_meta(self, meta: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self._local_meta(meta, optimizer)


def _is_pipeline(slot: Any) -> bool:
    from dsk_parallel.pipeline_config import PipelineConfig

    return isinstance(getattr(slot, "config", None), PipelineConfig)


class _TorchPipeline(Pipeline):
    """A schedule of torch.distributed.pipelining over this rank's stage runners (``1f1b``, ``dualpipev``)."""

    def run_schedule(self, input_ids: torch.Tensor, feed: list[dict[str, Any]], loss_fn: Any) -> None:
        for r in self.runners:
            r.start(feed, loss_fn)
        rows, T = input_ids.shape
        shape = (rows // self.chunks, T)
        schedule = self._torch_schedule(shape, self._activation_dtype(), input_ids.device)
        args = (input_ids,) if any(r.first for r in self.runners) else ()
        target = torch.zeros(self.chunks) if any(r.last for r in self.runners) else None
        schedule.step(*args, target=target, return_outputs=False)

    def _torch_schedule(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Any:
        """torch's schedule over this rank's stages, one per activation shape (torch infers the P2P shapes once)."""
        from torch.distributed.pipelining import PipelineStage

        key = (shape, dtype, device)
        if key not in self._schedules:
            # static shapes (torch's dynamic inference would run an extra forward, and the runners count them):
            # ids [b, T] into the first stage, hidden states [b, T, D] between stages, a scalar loss out of the last
            b, T = shape
            hidden = torch.empty(b, T, self._model.config.dim, dtype=dtype, device=device, requires_grad=True)
            ids = torch.zeros(b, T, dtype=torch.long, device=device)
            stages = [
                PipelineStage(
                    r,
                    r.index,
                    self.n_stages(),
                    device,
                    group=self.pp_group,
                    input_args=ids if r.first else hidden,
                    output_args=torch.empty((), dtype=torch.float32, device=device) if r.last else hidden,
                )  # fmt: skip
                for r in self.runners
            ]
            for stage in stages:
                self._record_actions(stage)
            self._schedules[key] = self._make_schedule(stages)
        return self._schedules[key]

    def _record_actions(self, stage: Any) -> None:
        """Time the stage's forward, backward and weight-gradient actions into :attr:`timeline` while
        :attr:`trace` is on (the benchmark's measure of the bubble; off, the wrappers only test a flag)."""
        kinds = (("forward_one_chunk", "F"), ("backward_one_chunk", "B"), ("backward_weight_one_chunk", "W"))
        for method, kind in kinds:
            inner = getattr(stage, method)

            def timed(chunk: int, *args: Any, _inner: Any = inner, _kind: str = kind, **kwargs: Any) -> Any:
                if not self.trace:
                    return _inner(chunk, *args, **kwargs)
                t0 = self._now()
                out = _inner(chunk, *args, **kwargs)
                self.timeline.append((_kind, stage.stage_index, chunk, t0, self._now()))
                return out

            setattr(stage, method, timed)

    @abc.abstractmethod
    def _make_schedule(self, stages: list[Any]) -> Any:
        """torch's schedule object over this rank's ``PipelineStage`` list."""

    @staticmethod
    def _loss(output: torch.Tensor, target: Any) -> torch.Tensor:
        """torch's ``loss_fn``: the last stage's runner already returns the chunk's loss."""
        return output


class OneFOneB(_TorchPipeline):
    """``type = "1f1b"``: torch's ``Schedule1F1B``, stage r on rank r (the baseline)."""

    kind = "1f1b"

    def local_stages(self, pp_rank: int) -> list[int]:
        return [pp_rank]

    def _make_schedule(self, stages: list[Any]) -> Any:
        from torch.distributed.pipelining import Schedule1F1B

        return Schedule1F1B(stages[0], self.chunks, loss_fn=self._loss, scale_grads=False)


class DualPipeV(_TorchPipeline):
    """``type = "dualpipev"``: torch's ``ScheduleDualPipeV``, stages r and 2 PP - 1 - r on rank r."""

    kind = "dualpipev"

    def local_stages(self, pp_rank: int) -> list[int]:
        return [pp_rank, 2 * self.pp - 1 - pp_rank]

    def _make_schedule(self, stages: list[Any]) -> Any:
        from torch.distributed.pipelining import ScheduleDualPipeV

        return ScheduleDualPipeV(stages, self.chunks, loss_fn=self._loss, scale_grads=False)


class DualPipe(Pipeline):
    """``type = "dualpipe"``: DeepSeek's bidirectional schedule (:mod:`dsk_parallel.dualpipe`); rank r holds stage
    r for the chunks entering at rank 0 and stage PP - 1 - r for those entering at rank PP - 1 (the second half of
    each micro-batch's chunks)."""

    kind = "dualpipe"

    def local_stages(self, pp_rank: int) -> list[int]:
        return [pp_rank, self.pp - 1 - pp_rank]

    def run_schedule(self, input_ids: torch.Tensor, feed: list[dict[str, Any]], loss_fn: Any) -> None:
        from dsk_parallel.dualpipe import DualPipeSchedule

        half = self.chunks // 2
        forward, reverse = self.runners
        forward.start(feed[:half], loss_fn)
        reverse.start(feed[half:], loss_fn)
        if "schedule" not in self._schedules:
            peers = [self.global_rank(q) for q in range(self.pp)]
            self._schedules["schedule"] = DualPipeSchedule(
                (forward, reverse), pp_rank=self.pp_rank, pp_size=self.pp, group=self.pp_group, peers=peers,
                device=input_ids.device, zero_bubble=self.config.zero_bubble,
            )  # fmt: skip
        schedule = self._schedules["schedule"]
        schedule.record = self.trace
        if self.trace:
            schedule.trace = []
        chunks = [c["input_ids"] for c in feed]
        rows, T = feed[0]["input_ids"].shape
        dim = self._model.config.dim if self._model is not None else 0
        dtype = self._activation_dtype()
        schedule.step(
            chunks[:half] if self.pp_rank == 0 else None,
            chunks[half:] if self.pp_rank == self.pp - 1 else None,
            n_chunks=self.chunks, shape=(rows, T, dim), dtype=dtype,
        )  # fmt: skip
        if self.trace:  # (kind, direction, chunk, t0, t1): the model stage of a direction is this rank's runner
            for kind, direction, chunk, t0, t1 in schedule.trace:
                if kind != "comm":
                    self.timeline.append((kind, self.runners[direction].index, chunk, t0, t1))
