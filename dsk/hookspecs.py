"""Hook specifications: what a dsk plugin can implement.

Implementations are marked with ``@dsk.hookimpl`` and may take *fewer* arguments than the spec: new
arguments can be added to a spec later without breaking existing plugins. Registration hooks are called
by the registry itself, once per plugin, so that every component records which plugin provided it; they
must not be wrappers. Plugins never call dsk hooks themselves.

Types are imported under ``TYPE_CHECKING`` only: importing this module stays cheap (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dsk._markers import hookspec

if TYPE_CHECKING:  # pragma: no cover
    import click

    from dsk.api import Problem
    from dsk.api.runtime import BuiltRun, RunContext
    from dsk.registry import Registrar, Registry

# --------------------------------------------------------------------------------------------------
# Registration: called once when the registry is built (collect-all).
# Each receives ``register(kind, name, impl, *, config=NoConfig, summary=None, aliases=(), after=(), before=(),
# conflicts=(), hf=None)``.
# --------------------------------------------------------------------------------------------------


@hookspec
def register_model_components(register: Registrar) -> None:
    """Register model components: kinds ``attention``, ``ffn``, ``router`` and ``mtp``.

    :param register: ``register(kind, name, impl, *, config, summary, aliases)``; ``impl`` is a lazy
        ``"module:Attr"`` string (preferred) or the object itself; ``config`` a pydantic model from
        ``dsk.api.BaseConfig``. Registering a kind outside this hook's family raises at once.
    """


@hookspec
def register_features(register: Registrar) -> None:
    """Register features (kind ``feature``): precision, memory and step features such as FP8 or recompute.

    :param register: the registration callback (see :func:`register_model_components`).
    """


@hookspec
def register_parallel_strategies(register: Registrar) -> None:
    """Register parallel strategies (kind ``parallel``): data, expert and pipeline parallelism.

    :param register: the registration callback (see :func:`register_model_components`).
    """


@hookspec(firstresult=True)
def default_parallel_strategy(world_size: int) -> str | None:
    """The parallel strategy (a registered ``parallel`` name) of a run of ``world_size`` processes whose recipe
    has no ``[parallel]`` section; None leaves the choice to another plugin (the first answer wins).

    :param world_size: the number of processes the launcher started (more than 1).
    """


@hookspec
def register_optimizers(register: Registrar) -> None:
    """Register optimizers (kind ``optimizer``): built from the model's parameters by the build path.

    An implementation is ``impl(config, model)`` returning a ``torch.optim.Optimizer`` whose param groups
    carry ``"names"`` (the parameter names, so its state is saved by name); see :class:`dsk.api.OptimizerFactory`.

    :param register: the registration callback (see :func:`register_model_components`).
    """


@hookspec
def register_trainers(register: Registrar) -> None:
    """Register trainers (kind ``trainer``): pretrain, sft, grpo, rejection sampling, distillation.

    :param register: the registration callback (see :func:`register_model_components`).
    """


@hookspec
def register_tasks(register: Registrar) -> None:
    """Register data sources: kind ``task`` (seeded verifiable-problem generators) and ``tokenizer``.

    :param register: the registration callback (see :func:`register_model_components`).
    """


@hookspec
def register_rewards(register: Registrar) -> None:
    """Register reward functions (kind ``reward``) for RL trainers and rejection sampling.

    A reward implementation is ``fn(config, prompts, completions, **columns) -> list[float | None]``
    (``None`` means "not applicable" and is left out of group statistics).

    :param register: the registration callback (see :func:`register_model_components`).
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands or groups to the ``dsk`` command line.

    Called when the CLI resolves a command it does not know itself or lists its commands, never at import.

    :param cli: the root ``dsk`` click group; call ``cli.add_command(...)``.
    """


# --------------------------------------------------------------------------------------------------
# Recipe validation: after every slot has been checked against its config model (collect-all).
# --------------------------------------------------------------------------------------------------


@hookspec
def validate_recipe(recipe: dict[str, Any], resolved: dict[str, Any], registry: Registry) -> list[Problem] | None:
    """Report cross-component problems in a recipe (for example sizes that must divide each other).

    Every implementation runs and all problems are reported together.

    :param recipe: the merged recipe as plain TOML data (after layering and overrides).
    :param resolved: the recipe with every slot replaced by a :class:`dsk.api.ResolvedSlot`.
    :param registry: the component registry.
    :returns: a list of :class:`dsk.api.Problem` (each with a dotted key path), or None.
    """


@hookspec
def validate_launch(resolved: dict[str, Any], world_size: int) -> list[Problem] | None:
    """Report what a validated recipe cannot run on ``world_size`` processes (``--nproc``), before any starts.

    Every implementation runs (for the recipe and for each ``[[stages]]`` entry's resolved sections) and all
    problems are reported together, with exit code 2. A strategy checks the same again when its ranks set up (a
    ``torchrun`` launch never passes here).

    :param resolved: the recipe (or one stage) with every slot replaced by a :class:`dsk.api.ResolvedSlot`.
    :param world_size: the number of processes the run would start.
    :returns: a list of :class:`dsk.api.Problem` (each with a dotted key path), or None.
    """


# --------------------------------------------------------------------------------------------------
# Run time: step boundaries only, never per layer or per micro-batch.
# --------------------------------------------------------------------------------------------------


@hookspec
def on_run_built(ctx: RunContext, built: BuiltRun) -> None:
    """Called once a stage's run is built (model, features, strategy, optimizer), before its first step.

    ``dsk profile`` takes the run it measures here; a trainer that builds a second run (a frozen reference) calls
    it again with that one.

    :param ctx: the run context.
    :param built: the :class:`dsk.api.runtime.BuiltRun`.
    """


@hookspec
def on_component_metrics(ctx: RunContext, step: int, metrics: dict[str, Any]) -> None:
    """Called once per applied optimizer step with the components' raw step metrics, list-valued ones included
    (each MoE layer's per-expert ``expert_load``), read before ``after_optimizer_step`` resets them (the router bias update).

    :param ctx: the run context.
    :param step: the optimizer step being applied (1-based).
    :param metrics: ``"<module path>.<metric>"`` -> float or list of floats, plus the ``"<metric>/mean"`` and
        ``"/max"`` aggregates (:meth:`dsk.api.runtime.SideChannels.metrics`); every rank's merged in.
    """


@hookspec
def on_step_end(ctx: RunContext, step: int, metrics: dict[str, Any]) -> None:
    """Called once per optimizer step, after the update, with the step's metrics (loggers, sinks).

    :param ctx: the run context (run directory, rank, recipe).
    :param step: the optimizer step just completed (1-based).
    :param metrics: the metrics row written to ``metrics.jsonl`` for this step.
    """
