"""The one build path: a stage's validated sections -> a :class:`BuiltRun` (what every trainer and ``dsk profile`` run).

``build_run(ctx)`` makes, in this order (``dsk.api.contracts`` describes each stage)::

    parallel strategy setup     [parallel.*] (one process when there is none)
    tokenizer, task             [tokenizer], [data]
    model                       [model], weights from the seeded torch RNG
    features: transform_model   [features.*] in their declared order
    initial weights             ``init_from`` (previous stage / a trainer's init checkpoint)
    features: after_weights
    parallel: wrap_model
    optimizer                   [optimizer] over the model's trainable parameters
    parallel: wrap_optimizer, then features: wrap_optimizer
    side channels               the model's aux-loss / step-statistics components, collected once

and :meth:`BuiltRun.update` is the one optimizer update every trainer calls: clip, finite check (agreed by all
ranks), the features' step hooks around ``optimizer.step()``, the components' step statistics and bias updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsk.api.contracts import Feature, ParallelStrategy
from dsk.model.loss import SideChannels, collect_side_channels
from dsk.model.regions import profile_part
from dsk.train.context import RunContext, RunSetupError
from dsk.train.schedule import lr_at

__all__ = ["BuiltRun", "StepUpdate", "build_run", "build_parallel"]


@dataclass
class StepUpdate:
    """What :meth:`BuiltRun.update` did: whether the step was applied, the gradient norm, the step's metrics."""

    finite: bool
    grad_norm: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


class _Composite(ParallelStrategy):
    """Several ``[parallel.*]`` strategies on one run, e.g. expert parallelism with ZeRO-1 data parallelism.

    The first (in :attr:`~dsk.api.ParallelStrategy.wrap_order`, then recipe order) sets the process layout and the
    reductions; each wraps the model and the optimizer in turn and syncs the gradients it owns. A checkpoint method
    that one strategy overrides is that strategy's. When several override one, they chain (DeepSeek-V3's layout:
    expert shards inside ZeRO-1): the last of them in wrap order (the data strategy) makes the state, which the
    earlier ones complete with :meth:`~dsk.api.ParallelStrategy.gather_tensors` (their shards, gathered); on load
    the earlier ones first keep this rank's share (:meth:`~dsk.api.ParallelStrategy.shard_tensors`), then the last
    one loads. That needs the last one to declare :attr:`~dsk.api.ParallelStrategy.composes_checkpoints`; other
    combinations, and two strategies that both clip, are refused when the run is built, naming the recipe keys.
    """

    _SAVE = ("model_state_dict", "optimizer_state_dict")
    _LOAD = ("load_model_state_dict", "load_optimizer_state_dict")

    def __init__(self, strategies: list[ParallelStrategy]):
        super().__init__(None)
        self.strategies = sorted(strategies, key=lambda s: s.wrap_order)
        self.name = "+".join(s.name for s in self.strategies)
        self._chains: dict[str, list[ParallelStrategy]] = {}
        self.holds_part_of_model = any(s.holds_part_of_model for s in self.strategies)
        for method in ("forward_backward", "merge_component_metrics", "any_rank"):
            owners = [s for s in self.strategies if self._overrides(s, method)]
            if len(owners) > 1:
                names = " and ".join(f"parallel.{s.name}" for s in owners)
                raise RunSetupError(f"{names} both implement {method}; dsk cannot compose these two strategies")
            setattr(self, method, getattr(owners[0] if owners else self.strategies[0], method))
        for method in ("clip_grad_norm", *self._SAVE, *self._LOAD):
            owners = [s for s in self.strategies if self._overrides(s, method)]
            if method == "clip_grad_norm" and len(owners) > 1:
                owners = [s for s in owners if s.clips_for_all] or owners
            if len(owners) > 1:
                self._check_chain(method, owners)
                self._chains[method] = owners
            else:
                setattr(self, method, getattr(owners[0] if owners else super(), method))

    @staticmethod
    def _overrides(strategy: ParallelStrategy, method: str) -> bool:
        return getattr(type(strategy), method) is not getattr(ParallelStrategy, method)

    def _check_chain(self, method: str, owners: list[ParallelStrategy]) -> None:
        """Raise unless ``owners`` (all overriding ``method``) can chain it (class docstring)."""
        first, last = owners[0], owners[-1]
        keys = f"parallel.{first.name} and parallel.{last.name}"
        if method == "clip_grad_norm":
            raise RunSetupError(f"{keys} both implement clip_grad_norm; dsk cannot compose these two strategies")
        hook = "gather_tensors" if method in self._SAVE else "shard_tensors"
        for s in owners[:-1]:
            if not self._overrides(s, hook):
                raise RunSetupError(
                    f"{keys} both implement {method}, and parallel.{s.name} ({type(s).__name__}) has no {hook} to "
                    f"chain it with parallel.{last.name}'s; dsk cannot compose these two strategies"
                )
        if not last.composes_checkpoints:
            raise RunSetupError(
                f"{keys} both implement {method}, and parallel.{last.name} ({type(last).__name__}) does not hand "
                f"the parameters parallel.{first.name} sharded to it (composes_checkpoints); dsk cannot compose "
                f"these two strategies: change parallel.{last.name}.type (zero1 and replicate compose)"
            )

    # -- chained checkpoint methods: __init__ binds the one owner's method over these where there is one ----------
    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        from dsk.train.checkpoint import model_state_for_saving

        *earlier, last = self._chains["model_state_dict"]
        state = last.model_state_dict(model)
        state = state if state is not None else model_state_for_saving(model)
        for s in reversed(earlier):
            state = s.gather_tensors(state, model)
        return state

    def load_model_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], where: str) -> bool:
        from dsk.train.checkpoint import CheckpointLoadError, load_model_weights

        *earlier, last = self._chains["load_model_state_dict"]
        for s in earlier:
            state = s.shard_tensors(state, model, where)
        if not last.load_model_state_dict(model, state, where):
            try:
                load_model_weights(model, state, where)
            except CheckpointLoadError as exc:
                raise RunSetupError(str(exc)) from None
        return True

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        from dsk.train.optim import optimizer_state_to_tensors

        *earlier, last = self._chains["optimizer_state_dict"]
        state = last.optimizer_state_dict(optimizer, model)
        tensors, meta = state if state is not None else optimizer_state_to_tensors(optimizer)
        for s in reversed(earlier):
            tensors = s.gather_tensors(tensors, model)
            meta = s.gather_optimizer_meta(meta, optimizer)
        return tensors, meta

    def load_optimizer_state_dict(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        where: str,
    ) -> bool:
        from dsk.train.optim import load_optimizer_state

        *earlier, last = self._chains["load_optimizer_state_dict"]
        for s in earlier:
            tensors = s.shard_tensors(tensors, model, where)
            meta = s.shard_optimizer_meta(meta, optimizer)
        if not last.load_optimizer_state_dict(optimizer, model, tensors, meta, where):
            load_optimizer_state(optimizer, tensors, meta, where)
        return True

    def setup(self, run: Any) -> None:
        for s in self.strategies:
            s.setup(run)

    @property
    def rank(self) -> int:
        return self.strategies[0].rank

    @property
    def world_size(self) -> int:
        return self.strategies[0].world_size

    @property
    def is_writer(self) -> bool:
        return self.strategies[0].is_writer

    @property
    def data_rank(self) -> int:
        return self.strategies[0].data_rank

    @property
    def data_world_size(self) -> int:
        return self.strategies[0].data_world_size

    @property
    def device(self) -> str | None:
        return self.strategies[0].device

    def wrap_model(self, model: nn.Module, run: Any) -> nn.Module:
        for s in self.strategies:
            model = s.wrap_model(model, run)
        return model

    def wrap_optimizer(self, optimizer: Any, model: nn.Module, run: Any) -> Any:
        for s in self.strategies:
            optimizer = s.wrap_optimizer(optimizer, model, run)
        return optimizer

    def sync_gradients(self, model: nn.Module) -> None:
        for s in self.strategies:
            s.sync_gradients(model)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self.strategies[0].all_reduce(tensor, op)

    def reduce_step_statistics(self, tensors: list[torch.Tensor]) -> None:
        self.strategies[0].reduce_step_statistics(tensors)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.strategies[0].broadcast_object(obj, src)

    def barrier(self) -> None:
        self.strategies[0].barrier()

    def teardown(self) -> None:
        for s in reversed(self.strategies):
            s.teardown()


def _default_parallel(ctx: RunContext | None) -> ParallelStrategy:
    """One process: the base class; several ranks with no ``[parallel]``: the ``default_parallel_strategy`` hook's."""
    from dsk.train.context import launch_world_size

    world = launch_world_size()
    if world == 1 or ctx is None:
        return ParallelStrategy()
    name = ctx.pm.hook.default_parallel_strategy(world_size=world)
    if name is None:
        raise RunSetupError(
            f"{world} processes, but the recipe has no [parallel] section and no plugin provides a default "
            'strategy (hook default_parallel_strategy); add e.g. [parallel.data] type = "replicate"'
        )
    from dsk.api import build_component

    strategy = build_component(ctx.registry, "parallel", name)
    strategy.name = "data"
    return strategy


def build_parallel(sections: dict[str, Any], ctx: RunContext | None = None) -> ParallelStrategy:
    """The parallel strategy of ``[parallel.*]``; without one, one process (the base class), or on several ranks
    the default strategy a plugin names (``default_parallel_strategy``: plain data parallelism)."""
    slots = sections.get("parallel") or {}
    strategies = []
    for key, slot in slots.items():
        strategy = slot.build()
        if not isinstance(strategy, ParallelStrategy):
            raise RunSetupError(
                f"parallel.{key}: {slot.name!r} built a {type(strategy).__name__}, not a ParallelStrategy"
            )
        strategy.name = key
        strategies.append(strategy)
    if not strategies:
        return _default_parallel(ctx)
    return strategies[0] if len(strategies) == 1 else _Composite(strategies)


@dataclass
class BuiltRun:
    """Everything a trainer runs on, made by :func:`build_run` from one stage's sections.

    Attributes:
        ctx: the run context.
        tokenizer, task: from ``[tokenizer]`` and ``[data]`` (task None when the trainer asked for none).
        model: what the trainer runs (the parallel strategy's wrap of the features' model).
        base_model: the unwrapped model (its parts, its checkpoints).
        optimizer: from ``[optimizer]``, wrapped by the strategy and the features (None for a sampling-only run).
        optimizer_config: the ``[optimizer]`` config (schedule, clipping).
        features: the features, in the order they apply.
        parallel: the parallel strategy (one process by default).
        side: the model's side channels (auxiliary losses, step statistics), collected once.
    """

    ctx: RunContext
    tokenizer: Any
    task: Any
    model: nn.Module
    base_model: nn.Module
    optimizer: torch.optim.Optimizer | None
    optimizer_config: Any
    features: list[Feature]
    parallel: ParallelStrategy
    side: SideChannels

    @property
    def params(self) -> list[nn.Parameter]:
        """The optimizer's parameters (what is clipped)."""
        if self.optimizer is None:
            return []
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def features_in(self, stage: str) -> list[Feature]:
        """The features that act in ``stage`` (one of ``dsk.api.FEATURE_STAGES``), in order."""
        return [f for f in self.features if stage in f.stages]

    # -- data parallelism ---------------------------------------------------------------------------------------
    def local_rows(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This data rank's slice of a global batch (every tensor's rows ``r * B / W ... (r + 1) * B / W``).

        Every rank reads the same global batch of ``batch_size * data_world_size`` rows from the same stream and
        keeps its slice, so the data position is the same on every rank and a checkpoint resumes at any rank count.
        """
        world, rank = self.parallel.data_world_size, self.parallel.data_rank
        if world == 1:
            return batch
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                rows = value.shape[0]
                if rows % world:
                    raise RunSetupError(f"a global batch of {rows} rows does not split over {world} data ranks")
                per = rows // world
                value = value[rank * per : (rank + 1) * per]
            out[key] = value
        return out

    def global_sum(self, values: list[float] | list[int]) -> list[float]:
        """``values`` summed over the data-parallel ranks (one all-reduce; the values themselves in one process)."""
        if self.parallel.data_world_size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return self.parallel.all_reduce(t, "sum").tolist()

    def loss_weights(self, counts: list[int]) -> list[float]:
        """Weights for the mean losses of this rank's micro-batches, from their target counts.

        ``sum_i w_i * mean_loss_i``, back-propagated on every rank and averaged over the data-parallel ranks by
        the strategy (:meth:`dsk.api.ParallelStrategy.sync_gradients`), is the mean loss over every target of the
        step on all ranks: ``w_i = counts[i] * W / (global count)``. The global count is all-reduced, never
        averaged per rank, so N ranks with batch b train exactly as one process with batch N * b.
        """
        total = max(1.0, self.global_sum([sum(counts)])[0])
        world = self.parallel.data_world_size
        return [n * world / total for n in counts]

    def mean_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scalar tensors averaged over the data-parallel ranks (what a metrics row of a weighted loss reports)."""
        world = self.parallel.data_world_size
        if world == 1 or not values:
            return values
        keys = list(values)
        stacked = torch.stack([values[k].detach().to("cpu", torch.float64).reshape(()) for k in keys])
        stacked = self.parallel.all_reduce(stacked, "sum") / world
        return {k: stacked[i] for i, k in enumerate(keys)}

    # -- a step's forward and backward --------------------------------------------------------------------------
    def forward_backward(
        self, batches: list[dict[str, Any]], loss_fn: Callable[..., Any], *, aux_weight: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Forward and backward of one optimizer step's micro-batches; returns their loss parts, summed.

        The contract is :meth:`dsk.api.ParallelStrategy.forward_backward`'s: a strategy that cuts the model into
        stages runs its schedule; otherwise each batch runs through the whole model (MTP heads included), its
        loss is ``loss_fn(output, batch)[0]`` plus the components' auxiliary losses times ``aux_weight``, and is
        back-propagated at once.
        """
        parts = self.parallel.forward_backward(self, batches, loss_fn, aux_weight)
        if parts is not None:
            return parts
        total: dict[str, torch.Tensor] = {}
        for batch in batches:
            out = self.model(batch["input_ids"], mask=batch.get("mask"), with_mtp=True)
            loss, shares = loss_fn(out, batch)
            aux = self.side.aux_loss(loss.dtype)
            if aux is not None:
                loss = loss + aux * aux_weight
                shares = {**shares, "aux_loss": aux.detach().float() * aux_weight}
            shares = {"loss": loss.detach().float(), **shares}
            loss.backward()
            for key, value in shares.items():
                total[key] = total[key] + value if key in total else value
        return total

    @contextmanager
    def evaluation_model(self) -> Iterator[tuple[nn.Module | None, ParallelStrategy]]:
        """``(model, parallel)`` to evaluate or generate with: the run's model and strategy, or, when each rank
        holds only part of the model (:attr:`~dsk.api.ParallelStrategy.holds_part_of_model`), a one-process copy
        of the whole model on the writing rank (None elsewhere) and the one-process strategy.

        The copy is built from ``[model]`` with the features' ``transform_model`` applied and the gathered weights
        (:meth:`~dsk.api.ParallelStrategy.model_state_dict`, collective); it is dropped on exit.
        """
        parallel = self.parallel
        if not parallel.holds_part_of_model:
            yield self.model, parallel
            return
        from dsk.train.checkpoint import load_model_weights

        state = parallel.model_state_dict(self.base_model)
        model = None
        if parallel.is_writer:
            with torch.random.fork_rng(devices=[]):
                model = _apply(self.features, "transform_model", self.ctx.build_model(self.tokenizer.vocab_size),
                               self.ctx)  # fmt: skip
            load_model_weights(model, state, "the pipeline's gathered weights")
        try:
            yield model, ParallelStrategy()
        finally:
            del model
            parallel.barrier()

    # -- the learning rate -------------------------------------------------------------------------------------
    def lr_at(self, step: int, total_steps: int, *, max_warmup: int | None = None) -> float:
        """The ``[optimizer]`` schedule's rate at optimizer step ``step`` (1-based) of ``total_steps``."""
        cfg = self.optimizer_config
        warmup = cfg.warmup_steps if max_warmup is None else min(cfg.warmup_steps, max_warmup)
        return lr_at(
            step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=warmup, total_steps=total_steps, schedule=cfg.schedule
        )

    def set_lr(self, step: int, total_steps: int, *, max_warmup: int | None = None) -> float:
        """Set every param group's rate for step ``step``; returns it."""
        lr = self.lr_at(step, total_steps, max_warmup=max_warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # -- the one update ----------------------------------------------------------------------------------------
    def update(
        self,
        loss: torch.Tensor,
        step: int,
        *,
        foreach: bool | None = None,
        read_metrics: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> StepUpdate:
        """Clip, check, and apply (or skip) optimizer step ``step`` whose gradients are in ``.grad``.

        A step whose ``loss`` or gradient norm is non-finite on any rank is skipped on every rank: its gradients are
        dropped and so are its step statistics, so a skipped batch never moves a router bias. Otherwise the
        features' ``before_step`` hooks run, then ``optimizer.step()``, then the components' step metrics are read
        (``read_metrics`` turns them into row keys) before their ``after_optimizer_step`` resets them, then the
        features' ``after_step`` hooks.

        Args:
            loss: the step's total loss (detached is fine), checked for finiteness.
            step: the optimizer step (1-based).
            foreach: ``clip_grad_norm_``'s choice (None: torch's default).
            read_metrics: maps the side channels' metrics to the row's keys (default: none reported).
        """
        cfg = self.optimizer_config
        with profile_part("communication"):
            self.parallel.sync_gradients(self.model)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        with profile_part("optimizer"):
            grad_norm = self.parallel.clip_grad_norm(self.params, max_norm, foreach=foreach)
        finite = not self.parallel.any_rank(not (bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.side.zero_stats()
            return StepUpdate(False, grad_norm)
        self.parallel.reduce_step_statistics(self.side.stat_tensors())
        for feature in self.features_in("before_step"):
            with profile_part(f"feature {feature.name}"):
                feature.before_step(self, step)
        with profile_part("optimizer"):
            self.optimizer.step()
        merge = self.parallel.merge_component_metrics
        raw = self.side.metrics(merge)
        if self.ctx.pm is not None:  # a context built by hand (tests, benchmarks) may have no plugin manager
            self.ctx.pm.hook.on_component_metrics(ctx=self.ctx, step=step, metrics=raw)
        metrics = read_metrics(raw) if read_metrics is not None else {}
        self.side.after_optimizer_step()
        for feature in self.features_in("after_step"):
            with profile_part(f"feature {feature.name}"):
                metrics.update(feature.after_step(self, step) or {})
        return StepUpdate(True, grad_norm, metrics)

    # -- checkpoint state of the features ----------------------------------------------------------------------
    def feature_state(self) -> dict[str, dict[str, Any]]:
        """Each stateful feature's ``state_dict()``, keyed by its recipe name."""
        return {f.name: f.state_dict() for f in self.features_in("state")}

    def load_feature_state(self, state: dict[str, dict[str, Any]], where: str) -> None:
        """Restore :meth:`feature_state` (``--resume``).

        Raises:
            RunSetupError: a stateful feature of this run has no state in the checkpoint.
        """
        for f in self.features_in("state"):
            if f.name not in state:
                raise RunSetupError(f"{where}: holds no state of feature '{f.name}', so the run cannot resume exactly")
            f.load_state_dict(state[f.name])


def _build_features(ctx: RunContext) -> list[Feature]:
    out = []
    for key, slot in (ctx.section("features") or {}).items():  # already in application order (recipe validation)
        feature = slot.build()
        if not isinstance(feature, Feature):
            raise RunSetupError(
                f"features.{key}: {slot.name!r} built a {type(feature).__name__}, not a dsk.api.Feature"
            )
        feature.name = key
        out.append(feature)
    return out


def _apply(features: list[Feature], stage: str, model: nn.Module, run: Any) -> nn.Module:
    for f in features:
        if stage in f.stages:
            replaced = getattr(f, stage)(model, run)
            model = replaced if replaced is not None else model
    return model


def build_run(
    ctx: RunContext,
    *,
    init_from: Path | str | None = None,
    with_task: bool = True,
    with_optimizer: bool = True,
    prepare: Callable[[nn.Module], Any] | None = None,
    tokenizer: Any = None,
) -> BuiltRun:
    """Build one stage's run from its validated sections (see the module docstring for the order).

    Args:
        ctx: the run context (sections, seed, device, registry).
        init_from: a checkpoint whose weights initialise the model (default: ``ctx.init_from``, the previous stage).
        with_task: build ``[data]`` (a trainer that reads another data source passes False).
        with_optimizer: build ``[optimizer]`` (a sampling-only run passes False).
        prepare: called on the model before the optimizer is built (e.g. freezing heads a loss never reaches).
        tokenizer: use this tokenizer instead of building ``[tokenizer]``.

    Raises:
        RunSetupError: a section is missing, a checkpoint does not load, a plugin built the wrong kind of object.
    """
    from dsk.train.checkpoint import CheckpointLoadError, load_checkpoint, load_model_weights

    if ctx.parallel is None:  # once per stage: a trainer that builds a second run (a reference) shares it
        strategy = build_parallel(ctx.sections, ctx)
        strategy.setup(ctx)
        ctx.parallel = strategy
    parallel = ctx.parallel
    if not parallel.is_writer:  # one rank writes metrics and shows progress; the others run silently
        if getattr(ctx.metrics, "enabled", False):
            ctx.metrics.enabled = False
        if getattr(ctx.reporter, "enabled", False):
            ctx.reporter.enabled = False
    tokenizer = tokenizer if tokenizer is not None else ctx.build_tokenizer()
    task = ctx.build_task() if with_task else None
    features = _build_features(ctx)
    ctx.features = features
    if with_optimizer:  # a run that cannot fit the device is refused before it allocates (dsk.train.fit)
        from dsk.train.fit import check_fit

        check_fit(ctx.sections, parallel.world_size, ctx.device, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(ctx.seed)  # the model's initial weights are a function of the seed
    model = ctx.build_model(tokenizer.vocab_size)
    if parallel.world_size > 1:  # the C++ kernels the model declared, built now rather than in a step's collective
        from dsk.extension import load_declared

        load_declared()
    model = _apply(features, "transform_model", model, ctx)
    source = init_from if init_from is not None else ctx.init_from
    if source is not None:
        try:
            init = load_checkpoint(source, with_optimizer=False)
            load_model_weights(model, init.model_state, str(init.path))
        except CheckpointLoadError as exc:
            raise RunSetupError(f"cannot initialise the model from {source}: {exc}") from None
    model = _apply(features, "after_weights", model, ctx)
    base_model = model
    if prepare is not None:
        prepare(model)
    wrapped = parallel.wrap_model(model, ctx)
    optimizer = None
    optimizer_config = None
    slot = ctx.section("optimizer")
    if slot is not None:
        optimizer_config = slot.config
    if with_optimizer:
        if slot is None:
            raise RunSetupError("the trainer needs an [optimizer] (recipe validation fills in adamw by default)")
        optimizer = slot.build(wrapped)
        optimizer = parallel.wrap_optimizer(optimizer, wrapped, ctx)
        for f in features:
            if "wrap_optimizer" in f.stages:
                optimizer = f.wrap_optimizer(optimizer, wrapped, ctx)
    built = BuiltRun(
        ctx=ctx,
        tokenizer=tokenizer,
        task=task,
        model=wrapped,
        base_model=base_model,
        optimizer=optimizer,
        optimizer_config=optimizer_config,
        features=features,
        parallel=parallel,
        side=collect_side_channels(base_model),
    )
    if ctx.pm is not None:
        ctx.pm.hook.on_run_built(ctx=ctx, built=built)
    return built
