"""The memory and communication estimate of one run, and the "cost share" protocol that fills it in (torch-free).

The core builds a :class:`RunEstimate` from the recipe's model on the meta device: the model's parts in order, with
the parameters and saved-activation bytes their components state (:class:`dsk.api.Cost`), the batch and the world
size. It names no technique: every config model of the recipe that implements :class:`SharesCost` (features,
``[optimizer]``, parallel strategies; a third-party plugin's too) then states its own share on the estimate (the
optimizer its state bytes, ZeRO-1 its sharding, a pipeline its stages per rank and bubble, recomputation what it
drops, ...), and the core only sums: :meth:`RunEstimate.rank_memory` gives the bytes of each pipeline rank.
``dsk plan`` prints them, and ``dsk train`` refuses a run whose estimate clearly exceeds the device's memory.

Shares run in ``cost_share_phase`` order (a class attribute of the config model, default 0; stable within a phase,
features first, then ``[optimizer]``, then ``[parallel.*]``): a share that lays out the ranks (a pipeline) or sets
the activation dtype (a precision feature) runs in phase -1, so the others read what it set.

Every figure is a lower bound of what the run allocates: parameters, gradients, optimizer state and the
activations the forward keeps for the backward, counted from the shapes; the allocator's rounding, workspace, the
temporary buffers of a backward and of the collectives, and the framework itself come on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["ActivationBytes", "PartEstimate", "RankMemory", "RankStages", "RunEstimate", "SharesCost", "StageLoad"]


@dataclass
class ActivationBytes:
    """Saved bytes per token, linear in the activation dtype's size: ``values * act_bytes + fixed``.

    Attributes:
        values: activation values per token (each ``act_bytes`` wide).
        fixed: bytes that do not follow the activation dtype (float32 statistics, the loss's log-probabilities).
    """

    values: float = 0.0
    fixed: float = 0.0

    def at(self, act_bytes: float) -> float:
        """The bytes per token at ``act_bytes`` per activation value."""
        return self.values * act_bytes + self.fixed

    def __add__(self, other: ActivationBytes) -> ActivationBytes:
        return ActivationBytes(self.values + other.values, self.fixed + other.fixed)

    @classmethod
    def from_two(cls, at2: float, at4: float) -> ActivationBytes:
        """From the bytes a component states at 2 and at 4 bytes per value."""
        values = (at4 - at2) / 2.0
        return cls(values, at2 - 2.0 * values)


@dataclass
class PartEstimate:
    """One part of the model, in the order a pipeline cuts it (``embed_tokens``, ``layers.<i>``, ``norm``,
    ``lm_head``, ``mtp.<k>``).

    Attributes:
        name: the part's name (a parameter name's first components, as the pipeline's ``part_of``).
        params: parameters the part holds (a tied head counts with the embedding).
        expert_params: of those, the routed experts' stacked parameters (expert parallelism shards them).
        activations: bytes per token the part's training forward saves for the backward (no recomputation).
        block_activations: of ``activations``, those saved inside the part's transformer blocks (recomputation
            acts on blocks).
        block_inputs: the inputs of the part's blocks per token (what full recomputation keeps of them).
        recomputable: per recomputable region name, the bytes per token inside the part's blocks that
            recomputing the region frees.
    """

    name: str
    params: int = 0
    expert_params: int = 0
    activations: ActivationBytes = field(default_factory=ActivationBytes)
    block_activations: ActivationBytes = field(default_factory=ActivationBytes)
    block_inputs: ActivationBytes = field(default_factory=ActivationBytes)
    recomputable: dict[str, ActivationBytes] = field(default_factory=dict)

    def activation_bytes(self, act_bytes: float, recompute: str | None, regions: frozenset[str] | None) -> float:
        """Saved bytes per token under ``recompute`` (None, ``"selective"`` with ``regions``: None for every
        region, or ``"full"``: each block keeps its input only)."""
        total = self.activations.at(act_bytes)
        if recompute == "full":
            return total - self.block_activations.at(act_bytes) + self.block_inputs.at(act_bytes)
        if recompute == "selective":
            dropped = sum(b.at(act_bytes) for r, b in self.recomputable.items() if regions is None or r in regions)
            return total - dropped
        return total


@dataclass
class StageLoad:
    """A model stage a pipeline rank runs: its parts and how many chunks' activations the rank holds at its peak.

    Attributes:
        parts: the names of the stage's parts.
        in_flight: chunks (of ``RunEstimate.tokens_per_chunk`` tokens each) whose forward activations of this stage
            are alive at once on the rank, at the schedule's peak.
    """

    parts: list[str]
    in_flight: float = 1.0


@dataclass
class RankStages:
    """What one pipeline rank runs (every data-parallel rank of a pipeline rank runs the same)."""

    stages: list[StageLoad]

    @property
    def parts(self) -> list[str]:
        """The parts the rank holds, each once (a part two of its stages share is held once)."""
        seen: list[str] = []
        for stage in self.stages:
            seen += [p for p in stage.parts if p not in seen]
        return seen


@dataclass
class RankMemory:
    """The estimated bytes of one pipeline rank (:meth:`RunEstimate.rank_memory`)."""

    rank: int
    params: float
    grads: float
    optimizer: float
    activations: float
    cpu: float
    parts: list[str]

    @property
    def total(self) -> float:
        """Device bytes: parameters, gradients, optimizer state and saved activations."""
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, keys in bytes."""
        return {
            "pipeline_rank": self.rank,
            "params_bytes": self.params,
            "grads_bytes": self.grads,
            "optimizer_bytes": self.optimizer,
            "activations_bytes": self.activations,
            "total_bytes": self.total,
            "cpu_bytes": self.cpu,
            "parts": list(self.parts),
        }


@dataclass
class RunEstimate:
    """One run's memory and communication model, built by the core and adjusted by the config models' shares.

    Attributes:
        parts: the model's parts in order (:class:`PartEstimate`).
        world_size: processes of the run.
        seq_len: tokens per row; ``dim``: the model width (what a strategy's per-token message sizes need).
        tokens_per_micro_batch: tokens one data rank runs per micro-batch (trainer ``batch_size * seq_len``).
        grad_accum: micro-batches per optimizer step (their activations are freed in between: no multiple).
        param_bytes, grad_bytes: bytes per parameter and per gradient on the device (dsk keeps FP32 parameters,
            which are also the master weights, and FP32 gradients).
        optimizer_bytes_per_param: optimizer state bytes per parameter (the optimizer's share).
        optimizer_alternatives: other optimizer choices and their state bytes per parameter, for comparison
            (``{"adamw_bf16": 4.0}``), stated by the optimizer's share.
        act_bytes: bytes per activation value (4: FP32; a precision feature sets 2).
        param_shards, grad_shards, optimizer_shards: how many ranks share the non-expert parameters, gradients and
            optimizer state (data-parallel sharding).
        expert_shards: ranks the routed experts are spread over (expert parallelism); with more than one, the
            expert parameters are not data-parallel sharded (each rank holds its own slice and its state).
        pipeline_ranks: ranks the model is cut over (world = pipeline_ranks x data ranks).
        chunks: pieces each micro-batch is cut into by a pipeline (1 without one).
        ranks: per pipeline rank, its stages and in-flight multiples (default: one rank with the whole model and one
            micro-batch in flight).
        recompute: None, ``"selective"`` or ``"full"``; ``recomputed_regions``: selective's regions (None: all).
        optimizer_on_cpu: the optimizer state lives in CPU memory (offload).
        cpu_bytes_per_param: CPU-resident copies per held parameter, by what holds them (``{"ema": 4.0}``).
        comm_bytes_per_token: communication figures by name, bytes per token (a strategy's share).
        bubble: the pipeline schedule's idle fraction and how it was computed (a pipeline's share).
        details: JSON-ready figures behind a share's numbers, by topic (``{"all_to_all": {"copies": ...}}``).
        notes: how each share counted, by who stated it (printed by ``dsk plan --json``).
    """

    parts: list[PartEstimate]
    world_size: int = 1
    seq_len: int = 1
    dim: int = 0
    tokens_per_micro_batch: int = 1
    grad_accum: int = 1
    param_bytes: float = 4.0
    grad_bytes: float = 4.0
    optimizer_bytes_per_param: float = 0.0
    optimizer_alternatives: dict[str, float] = field(default_factory=dict)
    act_bytes: float = 4.0
    param_shards: int = 1
    grad_shards: int = 1
    optimizer_shards: int = 1
    expert_shards: int = 1
    pipeline_ranks: int = 1
    chunks: int = 1
    ranks: list[RankStages] | None = None
    recompute: str | None = None
    recomputed_regions: frozenset[str] | None = None
    optimizer_on_cpu: bool = False
    cpu_bytes_per_param: dict[str, float] = field(default_factory=dict)
    comm_bytes_per_token: dict[str, float] = field(default_factory=dict)
    bubble: dict[str, Any] | None = None
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def data_ranks(self) -> int:
        """Data-parallel ranks of each pipeline rank (world / pipeline ranks)."""
        return max(1, self.world_size // max(1, self.pipeline_ranks))

    @property
    def tokens_per_chunk(self) -> float:
        """Tokens of one pipeline chunk (the whole micro-batch without a pipeline)."""
        return self.tokens_per_micro_batch / max(1, self.chunks)

    def part(self, name: str) -> PartEstimate:
        """The part called ``name``."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    def layouts(self) -> list[RankStages]:
        """The pipeline ranks' stages (one rank holding every part, one micro-batch in flight, without a pipeline)."""
        if self.ranks:
            return self.ranks
        return [RankStages([StageLoad([p.name for p in self.parts], 1.0)])]

    def rank_memory(
        self,
        *,
        recompute: str | None | bool = True,
        regions: frozenset[str] | None | bool = True,
        optimizer_bytes_per_param: float | None = None,
    ) -> list[RankMemory]:
        """The bytes of each pipeline rank; keyword arguments replace the estimate's own choice (for comparisons:
        ``recompute=None`` is without recomputation; ``True`` keeps the estimate's)."""
        mode = self.recompute if recompute is True else recompute
        chosen = self.recomputed_regions if regions is True else regions
        opt_bytes = self.optimizer_bytes_per_param if optimizer_bytes_per_param is None else optimizer_bytes_per_param
        by_name = {p.name: p for p in self.parts}
        out = []
        for r, layout in enumerate(self.layouts()):
            held = [by_name[n] for n in layout.parts]
            experts = sum(p.expert_params for p in held)
            dense = sum(p.params for p in held) - experts
            if self.expert_shards > 1:  # each rank holds its slice of the experts, outside data-parallel sharding
                local = experts / self.expert_shards
            else:
                dense, local = dense + experts, 0.0
            params = dense / self.param_shards + local
            optimizer = opt_bytes * (dense / self.optimizer_shards + local)
            cpu = sum(self.cpu_bytes_per_param.values()) * params
            if self.optimizer_on_cpu:
                cpu, optimizer = cpu + optimizer, 0.0
            activations = 0.0
            for stage in layout.stages:
                per_token = sum(by_name[n].activation_bytes(self.act_bytes, mode, chosen) for n in stage.parts)
                activations += stage.in_flight * self.tokens_per_chunk * per_token
            out.append(
                RankMemory(
                    rank=r,
                    params=self.param_bytes * params,
                    grads=self.grad_bytes * (dense / self.grad_shards + local),
                    optimizer=optimizer,
                    activations=activations,
                    cpu=cpu,
                    parts=list(layout.parts),
                )
            )
        return out

    def most_loaded(self, **kwargs: Any) -> RankMemory:
        """The pipeline rank with the most device bytes (:meth:`rank_memory`'s keyword arguments)."""
        return max(self.rank_memory(**kwargs), key=lambda m: m.total)

    @property
    def moe_layers(self) -> int:
        """Parts with routed experts (one MoE layer each: a main layer or an MTP depth's block)."""
        return sum(1 for p in self.parts if p.expert_params > 0)


@runtime_checkable
class SharesCost(Protocol):
    """A config model (feature, optimizer, parallel strategy) that states its share of a run's cost.

    ``share_cost`` adjusts ``estimate`` in place from the config's own options and the validated recipe
    (``resolved``: the sections as ``dsk.recipe.validate_recipe`` gives them): it must stay torch-free and fast, as
    ``dsk plan`` and ``dsk train``'s fit check call it on the recipe alone. A class attribute
    ``cost_share_phase`` (default 0) orders the shares; -1 for one that others read (a pipeline's layout).
    """

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """State this config's share on ``estimate`` (in place)."""
