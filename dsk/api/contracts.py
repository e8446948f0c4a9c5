"""The run-time contracts of dsk's plugin kinds: features, parallel strategies, optimizers, model side channels.

Torch-free (torch types are named under ``TYPE_CHECKING`` only) and re-exported by :mod:`dsk.api`. The build path
(:func:`dsk.api.runtime.build_run`) is the only caller of these methods; a plugin implements them.

Build order (one stage of a recipe; each step sees what the previous ones made)::

    tokenizer, task           [tokenizer], [data]
    model                     [model] (weights drawn from the seeded torch RNG)
    Feature.transform_model   in feature order: change the model's structure (e.g. swap linears for FP8 ones)
    initial weights           the previous stage's checkpoint or a trainer's init checkpoint
    Feature.after_weights     in feature order: what needs the real weights (e.g. an EMA copy)
    ParallelStrategy.wrap     the strategy wraps, shards or cuts the model
    optimizer                 [optimizer] over the (wrapped) model's parameters
    ParallelStrategy.wrap_optimizer, then Feature.wrap_optimizer in feature order
                              so a sharding strategy (ZeRO-1) wraps first, BF16 moments live in the [optimizer]
                              component itself, and a CPU offload declared ``after`` the others wraps last
    side channels             the model's auxiliary-loss and step-statistics providers, collected once

Per optimizer step (the shared update, :meth:`dsk.api.runtime.BuiltRun.update`): gradient clipping and the
finite check, ``Feature.before_step``, ``optimizer.step()``, the step statistics read, the components'
``after_optimizer_step`` (router bias updates), ``Feature.after_step``. A skipped (non-finite) step runs none of
them and zeroes the step statistics. ``Feature.state_dict`` goes into every checkpoint and comes back through
``Feature.load_state_dict`` on ``--resume``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "FEATURE_STAGES",
    "AfterOptimizerStep",
    "AuxLossSource",
    "Cost",
    "CostModel",
    "Profiled",
    "ExpertShardable",
    "Feature",
    "LinearLayers",
    "LinearShapes",
    "ParallelStrategy",
    "SHARDED_PARAM",
    "StepStatistics",
]

#: the stages a feature may act in, in the order the build path and the update run them
FEATURE_STAGES: tuple[str, ...] = (
    "transform_model",
    "after_weights",
    "wrap_optimizer",
    "before_step",
    "after_step",
    "state",
)


class Feature:
    """Base class of a feature (kind ``feature``): a precision, memory or step technique applied from outside.

    A feature is built as ``impl(config)`` from its ``[features.<name>]`` table and acts only in the stages it lists
    in ``stages`` (a subset of :data:`FEATURE_STAGES`); the build path calls nothing else. Its order relative to
    other features is declared when it is registered (``register("feature", name, impl, after=(...),
    before=(...), conflicts=(...))``), so it is known, and checked, when the recipe is validated.

    Attributes:
        stages: the stages this feature acts in.
        name: the recipe key it was built from (``[features.<name>]``), set by the build path.
    """

    stages: ClassVar[tuple[str, ...]] = ()
    name: str = ""

    def __init__(self, config: Any = None):
        self.config = config

    def transform_model(self, model: nn.Module, run: Any) -> nn.Module | None:
        """Change the model before its initial weights are loaded; return a replacement or None (changed in place)."""
        return None

    def after_weights(self, model: nn.Module, run: Any) -> nn.Module | None:
        """Act on the model once its initial weights are in place; return a replacement or None."""
        return None

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, run: Any) -> torch.optim.Optimizer:
        """Wrap or replace the optimizer; the result keeps ``param_groups`` with their ``"names"``."""
        return optimizer

    def before_step(self, run: Any, step: int) -> None:
        """Runs after the gradients of step ``step`` are final (clipped, finite), before ``optimizer.step()``."""

    def after_step(self, run: Any, step: int) -> dict[str, float] | None:
        """Runs after the update of step ``step``; may return metrics for the step's row."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State saved in every checkpoint: tensors (saved as safetensors) and JSON values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (``--resume``)."""


#: attribute a strategy sets to True on a parameter it sharded itself (an expert-parallel slice): a data-parallel
#: strategy composed with it neither wraps nor reduces that parameter
SHARDED_PARAM = "_dsk_sharded"


class ParallelStrategy:
    """Base class of a parallel strategy (kind ``parallel``) and the one-process default behind the same interface.

    A strategy sets up its process groups (a DeviceMesh) with ``torch.distributed``, wraps the model (or cuts it
    into stages), says which slice of the data stream this rank reads, reduces what must be reduced across ranks,
    and says which rank writes the run directory (metrics, checkpoints, ``resolved.toml``, the summary). The base
    class is one process: rank 0 of 1, writes everything, reduces nothing.
    """

    name: str = "single"
    #: strategies of one run wrap the model in ascending order of this (one that slices parameters, such as
    #: expert parallelism, comes before a data-parallel wrap that must see the slices); ties keep recipe order
    wrap_order: int = 0

    def __init__(self, config: Any = None):
        self.config = config

    # -- process layout ----------------------------------------------------------------------------------------
    def setup(self, run: Any) -> None:
        """Create the process groups / DeviceMesh; runs before the model is built."""

    @property
    def rank(self) -> int:
        """This process's rank among all ranks."""
        return 0

    @property
    def world_size(self) -> int:
        """The number of processes."""
        return 1

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes metrics, checkpoints, ``resolved.toml`` and the summary, and shows progress."""
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which slice of each global batch this rank reads."""
        return 0

    @property
    def data_world_size(self) -> int:
        """Into how many slices each global batch is cut."""
        return 1

    @property
    def device(self) -> str | None:
        """The device this rank computes on (``cuda:<local rank>`` on GPUs), or None to keep the trainer's choice."""
        return None

    # -- model and optimizer -----------------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module, run: Any) -> nn.Module:
        """Wrap, shard or cut the model; returns what the trainer runs."""
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, run: Any) -> torch.optim.Optimizer:
        """Shard the optimizer state (ZeRO-1) or return it unchanged."""
        return optimizer

    def sync_gradients(self, model: nn.Module) -> None:
        """Make the gradients in ``.grad`` the data-parallel mean, where backward hooks have not already done so.

        :meth:`dsk.api.runtime.BuiltRun.update` calls it once per optimizer step, before clipping. The gradient
        of a replicated parameter becomes the mean over the data-parallel ranks (trainers weight their losses
        for this: :meth:`dsk.api.runtime.BuiltRun.loss_weights`); a parameter another strategy sharded
        (:data:`SHARDED_PARAM`) is left to that strategy.
        """

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float, foreach: bool | None = None) -> torch.Tensor:
        """Clip the gradients of ``params`` to a total norm of ``max_norm``; returns the norm before clipping.

        The norm is that of the whole model's gradient: a strategy whose ranks hold different parameters (expert
        shards) adds the other ranks' shares, so every rank clips by the same factor one process would.
        """
        import torch

        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)

    # -- reductions --------------------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` in place over the data-parallel ranks (``sum``, ``max`` or ``mean``); returns it."""
        return tensor

    def reduce_step_statistics(self, tensors: list[torch.Tensor]) -> None:
        """Sum the components' step statistics (expert loads) over the ranks before they are read or applied."""
        for t in tensors:
            self.all_reduce(t, "sum")

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (a picklable value made by this program, never read from a file)."""
        return obj

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is True on any rank of the run (every rank, whatever the layout); collective.

        The core agrees on interrupts and skipped steps with it. The base class reduces over the data-parallel
        ranks, which are every rank unless a strategy cuts the model into stages; such a strategy overrides it.
        """
        import torch

        return float(self.all_reduce(torch.tensor(1.0 if flag else 0.0), "max")) > 0

    def barrier(self) -> None:
        """Wait for every rank."""

    def teardown(self) -> None:
        """Release the process groups at the end of the run."""

    # -- the step's forward and backward (a pipeline) ------------------------------------------------------------
    #: True when each rank holds only part of the model's layers (a pipeline's stages): the core then evaluates
    #: and generates on the writing rank, on a one-process copy of the whole model made from
    #: :meth:`model_state_dict`, and runs a step's micro-batches through :meth:`forward_backward`
    holds_part_of_model: bool = False

    #: True when :meth:`clip_grad_norm` computes the whole model's norm over every rank itself, the parameters
    #: other strategies of the run sharded included (it is then the run's clip, whoever else implements one)
    clips_for_all: bool = False

    def forward_backward(
        self, run: Any, batches: list[dict[str, Any]], loss_fn: Any, aux_weight: float
    ) -> dict[str, torch.Tensor] | None:
        """Run the forward and backward of one optimizer step's micro-batches, or return None (the core runs them
        one after the other on the whole model: :meth:`dsk.api.runtime.BuiltRun.forward_backward`).

        A pipeline cuts each micro-batch into chunks along its rows and schedules them over its stages. The
        contract, for either path:

        - ``batches``: dicts with ``input_ids`` [B, T], ``mask`` ([B, T, S] or None) and whatever the trainer's
          loss reads (``labels`` [B, T]); every tensor with a row dimension is cut along it;
        - ``loss_fn(output, batch) -> (loss, parts)``: the trainer's weighted loss of one micro-batch (or chunk)
          from the last stage's :class:`dsk.api.runtime.ModelOutput` (MTP logits included), and its detached
          parts by name (``lm_loss``, ``mtp_loss``); it weights by global counts, so a chunk's loss is its share;
        - the components' auxiliary losses (:class:`AuxLossSource`) of every stage are added times
          ``aux_weight`` times the chunk's share of the micro-batch's rows, and back-propagated on their stage;
        - returns the parts summed over the step, ``loss`` (everything) and ``aux_loss`` included, the same on
          every rank (a pipeline adds up what each stage computed).
        """
        return None

    def merge_component_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The model components' step metrics of every rank that holds other components (a pipeline's stages),
        keyed by module path, from this rank's (``metrics``); collective. The base class returns them as they
        are."""
        return metrics

    # -- checkpoints (collective: every rank calls them, in the same order) -------------------------------------
    # The base class returns None / False: the core then saves and loads as one process does. A sharding strategy
    # overrides them, so that a checkpoint is one file set in the one-process format that any rank count (and
    # ``dsk eval``) loads.
    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's state as CPU tensors under the unwrapped model's names, or None (the model's own).

        Called on every rank when a checkpoint is written; the writing rank's result is saved, other ranks may
        return ``{}``. ``model`` is :attr:`dsk.api.runtime.BuiltRun.base_model`.
        """
        return None

    def load_model_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], where: str) -> bool:
        """Load a whole-model state (every rank read it from the checkpoint) into the wrapped model; False: not
        handled (the core loads it as one process does).

        Raises:
            dsk.api.runtime.RunSetupError: the state does not fit the model (the message names ``where``).
        """
        return False

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The whole optimizer state as ``(tensors by "<parameter name>/<key>", JSON skeleton)``, the format of
        :func:`dsk.api.runtime.optimizer_state_to_tensors`, or None (the optimizer's own). Collective like
        :meth:`model_state_dict`; a strategy that shards the state (ZeRO-1, FSDP) gathers it here."""
        return None

    def load_optimizer_state_dict(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        where: str,
    ) -> bool:
        """Load what :meth:`optimizer_state_dict` returned (every rank holds all of it; each keeps its share);
        False: not handled (:func:`dsk.api.runtime.load_optimizer_state` loads it)."""
        return False

    # -- composing checkpoints (optional) ------------------------------------------------------------------------
    # Two strategies of one run may both implement a checkpoint method: expert parallelism (it shards the experts)
    # and ZeRO-1 (it shards the optimizer state). The run then chains them: the strategy that wraps last (the
    # data strategy) makes the state, and each earlier one that sharded parameters itself completes its
    # parameters' entries with gather_tensors; on load, each earlier one first keeps this rank's share with
    # shard_tensors, then the last one loads. The last one must declare that it takes part (composes_checkpoints).

    #: True when this strategy's checkpoint methods take part in such a chain: its ``model_state_dict`` /
    #: ``optimizer_state_dict`` return, on EVERY rank (the writer with the rest of the state), the entries of the
    #: parameters another strategy sharded (:data:`SHARDED_PARAM`) as this rank holds them, and its loaders accept
    #: those entries as :meth:`shard_tensors` left them (this rank's share)
    composes_checkpoints: bool = False

    def gather_tensors(self, tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """``tensors`` (a model state, or an optimizer state's tensors keyed ``"<parameter name>/<key>"``, made by
        another strategy) with the entries of the parameters THIS strategy sharded completed into their full
        tensors (collective: every rank calls it with the same keys of those parameters). Identity by default."""
        return tensors

    def gather_optimizer_meta(self, meta: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state's JSON skeleton (made by another strategy) completed with the parameters this
        strategy keeps on other ranks, in the one-process form (collective, alongside :meth:`gather_tensors`). A
        pipeline's ranks each hold other parameters; the default returns ``meta`` unchanged."""
        return meta

    def shard_optimizer_meta(self, meta: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The inverse of :meth:`gather_optimizer_meta` on a whole-model skeleton: this rank's part (the default
        returns ``meta`` unchanged)."""
        return meta

    def shard_tensors(self, tensors: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`gather_tensors` on a full state every rank read: this rank's share of the entries
        of the parameters this strategy sharded, before another strategy loads the state. Identity by default.

        Raises:
            dsk.api.runtime.RunSetupError: an entry does not fit the parameter (the message names ``where``).
        """
        return tensors


@runtime_checkable
class AuxLossSource(Protocol):
    """A model component with an auxiliary loss (the MoE balance loss): the training loss adds it."""

    def aux_loss(self) -> torch.Tensor | None:
        """The auxiliary loss of the last forward (a scalar already weighted), or None."""


@runtime_checkable
class StepStatistics(Protocol):
    """A model component that counts something over an optimizer step (per-expert loads)."""

    def step_stat_tensors(self) -> list[torch.Tensor]:
        """The counters of this step: a data-parallel strategy sums them, a skipped step zeroes them."""

    def step_metrics(self) -> dict[str, float | list[float]]:
        """Metrics of the step (``maxvio``; lists such as per-expert loads), read before the update resets them."""


@runtime_checkable
class AfterOptimizerStep(Protocol):
    """A model component that acts after each optimizer step, never on gradients (a router's bias update)."""

    def after_optimizer_step(self) -> None:
        """Apply and reset this step's statistics."""


@runtime_checkable
class LinearLayers(Protocol):
    """A model component whose projections run through a swappable implementation (FP8 GEMMs, for one).

    The component computes every product of its linear layers with ``self.linear_impl.linear(x, w, site)`` (and
    stacked experts with ``linear_impl.grouped``), where ``linear_impl`` is a
    :class:`dsk.api.runtime.LinearImpl` (default :data:`dsk.api.runtime.PLAIN_LINEAR`). A feature sets
    ``module.linear_impl`` in ``transform_model``; what a component computes otherwise (a router gate, the head,
    the embedding, the MTP projection) is untouched by it.
    """

    linear_impl: Any

    def linear_sites(self) -> list[Any]:
        """The GEMMs it runs through ``linear_impl``, as :class:`dsk.api.runtime.LinearSite` (name, N, K, key)."""


@runtime_checkable
class ExpertShardable(Protocol):
    """A routed-experts layer (an MoE FFN) whose experts an expert-parallel strategy can spread over ranks.

    The layer keeps its router and shared experts on every rank. ``shard_experts(start, stop, dispatcher)``
    keeps only the routed experts ``start:stop`` (its stacked expert parameters become those slices, new
    ``nn.Parameter`` objects) and from then on hands the routed part of each forward to ``dispatcher``::

        routed_ND = dispatcher(x_ND, weights_NK, idx_NK, local_experts)

    where ``idx_NK`` are global expert ids, and ``local_experts(x_RD, load_E, scale_R)`` runs this rank's experts
    on rows already sorted by local expert (``load_E`` rows each, long [stop - start]), each row's output scaled
    by ``scale_R``: the layer's own expert path (its CPU kernel, grouped GEMMs, a feature's ``linear_impl``).
    The dispatcher returns ``sum_k weights[n, k] * expert_{idx[n, k]}(x[n])`` for this rank's tokens, however it
    moved them. ``expert_parameter_names()`` names the stacked parameters (relative to the layer, first dim E)
    so the strategy can gather and slice them for checkpoints.

    Attributes:
        total_experts: E, the number of routed experts of the whole layer (sharded or not).
    """

    total_experts: int

    def shard_experts(self, start: int, stop: int, dispatcher: Any) -> None:
        """Keep routed experts ``start:stop`` only and route through ``dispatcher`` (see the class docstring)."""

    def expert_parameter_names(self) -> list[str]:
        """The stacked routed-expert parameters' names relative to this module (``experts.w_gate``, ...)."""

    def expert_groups(self) -> tuple[int, int]:
        """The router's group limit ``(n_groups, topk_groups)`` ((1, 1) when it has none)."""


@runtime_checkable
class LinearShapes(Protocol):
    """A component *config* that states the reduction lengths K of its linear layers (torch-free).

    Recipe validation uses it where a rule depends on them before any model exists (an FP8 block size must
    divide every K). Keys are the config's own field names (the message's key path is the slot's path plus the
    key); the model dim D, the input of every block, is checked from ``[model] dim`` by the caller.
    """

    def linear_in_features(self, dim: int) -> dict[str, int]:
        """``{config key: K}`` for each linear layer's K that this config sets (D excluded)."""


@dataclass(frozen=True)
class Cost:
    """What one component costs per token, analytically (the cost protocol, :class:`CostModel`).

    A component states only what it holds and computes itself, never what its child modules that are themselves
    :class:`CostModel` state (an MTP module reports its projection and norms; the attention and FFN of its block
    report themselves), so the core sums every cost-reporting module of a model once
    (:func:`dsk.model.cost.model_cost`) and names no technique. FLOPs are those of the matrix products (2 per
    multiply-add), the convention of model FLOP utilisation: norms, activations, softmax and RoPE are left out.

    Attributes:
        params: parameters this component holds (its own, not its cost-reporting children's); after expert
            parallelism sharded it, this rank's share.
        active_params: of those, the ones one token's forward passes through (MoE: the router, the shared experts
            and ``top_k`` routed experts).
        flops_per_token: forward FLOPs per token at context length ``seq_len``, the attention's score and value
            products included (causal: averaged over positions, ``seq_len / 2`` keys per query).
        activation_bytes_per_token: bytes a training forward saves for the backward per token (no recomputation),
            at ``act_bytes`` per value.
        kv_bytes_per_token: inference KV-cache bytes per token, at ``act_bytes`` per value.
        comm_bytes_per_token: bytes sent per token by a parallel strategy (0 for model components).
        head_calls_per_token: times per token this component runs the model's shared output head (an MTP module:
            once per depth). The head is the core's: the core adds its FLOPs and saved logits for each call, which
            a component cannot state (it does not hold the head, nor know the vocabulary).
        expert_params: of ``params``, the routed experts' stacked parameters (what expert parallelism shards over
            its ranks; 0 for a component without routed experts).
        recomputable_bytes_per_token: per recomputable region name (the names the component passes to
            ``dsk.api.runtime.recomputable``: ``"norm"``, ``"attention.up_projection"``, ``"ffn.activation"``,
            ``"ffn.dispatch"``), the part of ``activation_bytes_per_token`` that recomputing the region frees: what
            its ops keep beyond the region's inputs, and the copies of its outputs that the ops after it save.
            Regions whose recomputation frees nothing may be left out.
    """

    params: int = 0
    active_params: int = 0
    flops_per_token: float = 0.0
    activation_bytes_per_token: float = 0.0
    kv_bytes_per_token: float = 0.0
    comm_bytes_per_token: float = 0.0
    head_calls_per_token: float = 0.0
    expert_params: int = 0
    recomputable_bytes_per_token: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: Cost) -> Cost:
        """The field-wise sum (the per-region bytes summed region by region)."""
        if not isinstance(other, Cost):
            return NotImplemented
        out: dict[str, Any] = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, dict):
                out[f.name] = {k: a.get(k, 0.0) + b.get(k, 0.0) for k in (*a, *(k for k in b if k not in a))}
            else:
                out[f.name] = a + b
        return Cost(**out)


@runtime_checkable
class CostModel(Protocol):
    """A model component (or strategy) that states its own :class:`Cost` per token, analytically (no forward).

    It must work on a model built on the meta device (``with torch.device("meta"): build_model(...)``): sizes
    come from the component's configuration and parameter shapes, never from parameter values.
    """

    def cost(self, seq_len: int, act_bytes: int = 2) -> Cost:
        """This component's own cost per token at context length ``seq_len``, ``act_bytes`` per activation."""


@runtime_checkable
class Profiled(Protocol):
    """A feature or parallel strategy with measurements of its own for ``dsk profile`` (optional).

    ``dsk profile`` calls :meth:`profile_start` on every feature and strategy that has it once the warm-up steps are
    done, runs the measured steps, then calls :meth:`profile_report` and puts what it returns into its report under
    the recipe name of the feature (or ``"parallel"`` for the strategy) and into ``--json``. Between the two calls
    the component records what only it can see (an FP8 feature its per-layer quantisation error, a pipeline its
    executed schedule); outside them it records nothing and costs nothing.

    Two keys of the report are drawn by ``dsk profile`` when present:

    * ``"timeline"``: a list of ``{"rank", "kind", "stage", "chunk", "start", "end"}`` (seconds from the first
      measured step's start on that rank), one per executed compute action: the timeline plot;
    * ``"bubble"``: a list of floats, the idle fraction of each rank over the measured steps.

    Every value is JSON-ready (numbers, strings, lists, dicts). Under several ranks each rank reports its own
    recordings; the report of the writing rank is printed, so a strategy gathers what the other ranks saw.
    """

    def profile_start(self) -> None:
        """Begin recording (called after the warm-up, before the first measured step)."""

    def profile_report(self) -> dict[str, Any]:
        """What was recorded since :meth:`profile_start` (JSON-ready); recording stops."""
