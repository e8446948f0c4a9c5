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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsk.api.contracts import Feature, ParallelStrategy
from dsk.model.loss import SideChannels, collect_side_channels
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
    """Several ``[parallel.*]`` strategies on one run: the first sets the process layout, each wraps in turn."""

    def __init__(self, strategies: list[ParallelStrategy]):
        super().__init__(None)
        self.strategies = strategies
        self.name = "+".join(s.name for s in strategies)

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

    def wrap_model(self, model: nn.Module, run: Any) -> nn.Module:
        for s in self.strategies:
            model = s.wrap_model(model, run)
        return model

    def wrap_optimizer(self, optimizer: Any, model: nn.Module, run: Any) -> Any:
        for s in self.strategies:
            optimizer = s.wrap_optimizer(optimizer, model, run)
        return optimizer

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self.strategies[0].all_reduce(tensor, op)

    def reduce_step_statistics(self, tensors: list[torch.Tensor]) -> None:
        self.strategies[0].reduce_step_statistics(tensors)

    def barrier(self) -> None:
        self.strategies[0].barrier()

    def teardown(self) -> None:
        for s in reversed(self.strategies):
            s.teardown()


def build_parallel(sections: dict[str, Any]) -> ParallelStrategy:
    """The parallel strategy of ``[parallel.*]``: one process (the base class) when the recipe has none."""
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
        return ParallelStrategy()
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
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=foreach)
        bad = torch.tensor(0.0 if bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)) else 1.0)
        finite = float(self.parallel.all_reduce(bad, "max")) == 0.0
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.side.zero_stats()
            return StepUpdate(False, grad_norm)
        self.parallel.reduce_step_statistics(self.side.stat_tensors())
        for feature in self.features_in("before_step"):
            feature.before_step(self, step)
        self.optimizer.step()
        metrics = read_metrics(self.side.metrics()) if read_metrics is not None else {}
        self.side.after_optimizer_step()
        for feature in self.features_in("after_step"):
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

    parallel = build_parallel(ctx.sections)
    parallel.setup(ctx)
    ctx.parallel = parallel
    if not parallel.is_writer:  # one rank writes metrics and shows progress; the others run silently
        if getattr(ctx.metrics, "enabled", False):
            ctx.metrics.enabled = False
        if getattr(ctx.reporter, "enabled", False):
            ctx.reporter.enabled = False
    tokenizer = tokenizer if tokenizer is not None else ctx.build_tokenizer()
    task = ctx.build_task() if with_task else None
    features = _build_features(ctx)
    torch.manual_seed(ctx.seed)  # the model's initial weights are a function of the seed
    model = ctx.build_model(tokenizer.vocab_size)
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
    return BuiltRun(
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
