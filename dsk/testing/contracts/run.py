"""Contract suites of the run-level kinds: ``feature``, ``parallel`` and ``trainer``.

These components act on a whole run, so each check registers the component under ``name`` in an isolated plugin
manager that also holds dsk's built-in plugins, then trains a tiny recipe (:func:`tiny_recipe`: a 2-layer MLA + MoE
model on single-digit arithmetic, a few steps, on the CPU) in-process through the runtime's own path
(:func:`dsk.train.runner.run_recipe`: build, loop, checkpoints, ``--resume``) in a temporary directory::

    from dsk.testing.contracts.run import check_feature

    def test_my_ema_meets_the_feature_contract():
        check_feature("my_ema.ema:EMA", EMAConfig, table={"decay": 0.9}, after=("fp8",))

Each check raises ``AssertionError`` naming the component, what is wrong and what to fix. The rules are those of
docs/plugins.md ("Component kinds and their contracts"): a feature's declared stages and its state through a
checkpoint and ``--resume``, a strategy's single-process equivalence, a trainer's metrics and summary. A run takes
about a second per step at these sizes.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsk import hookimpl
from dsk.testing.contracts import call as _call
from dsk.testing.contracts import fail as _fail

__all__ = ["check_feature", "check_parallel", "check_trainer", "tiny_recipe"]

#: the register hook of each kind these suites cover
_HOOKS = {"feature": "register_features", "parallel": "register_parallel_strategies", "trainer": "register_trainers"}


# -- helpers ---------------------------------------------------------------------------------------------------


def tiny_recipe() -> dict[str, Any]:
    """The recipe the checks train (a fresh table): MLA + a 4-expert MoE at dim 16, arithmetic, 4 steps of 4 rows.

    Every linear layer's K is a multiple of 8 (an FP8 block size of 8 fits), the model has router load statistics
    and an auxiliary loss (what a strategy reduces), and checkpoints are written only at the end or on an interrupt.
    """
    return {
        "dsk": {"seed": 0},
        "model": {
            "dim": 16,
            "n_layers": 2,
            "first_k_dense": 1,
            "max_seq_len": 32,
            "attention": {
                "type": "mla",
                "n_heads": 2,
                "q_lora_rank": 8,
                "kv_lora_rank": 8,
                "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 4,
                "v_head_dim": 8,
            },  # fmt: skip
            "ffn": {
                "type": "moe",
                "n_routed_experts": 4,
                "n_shared_experts": 1,
                "expert_hidden_dim": 8,
                "router": {"type": "noaux_tc", "top_k": 2},
            },  # fmt: skip
            "dense_ffn": {"type": "dense", "hidden_dim": 32},
        },
        "data": {"type": "arithmetic", "min_digits": 1, "max_digits": 1, "ops": ["+"], "test_size": 8},
        "trainer": {"type": "pretrain", "steps": 4, "batch_size": 4, "seq_len": 16, "eval_samples": 0},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"every": 0, "keep": 2},
        "logging": {"progress": False},
    }


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and "type" not in value:
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load(impl: Any) -> Any:
    if isinstance(impl, str):
        from dsk.names import import_string

        return _call(f"importing {impl!r}", import_string, impl)
    return impl


def _impl_path(impl: Any) -> str:
    """``impl`` as a ``"module:Class"`` string another process can import."""
    if isinstance(impl, str):
        return impl
    module, qual = getattr(impl, "__module__", ""), getattr(impl, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qual:
        _fail(
            f"{qual or impl!r} is not importable by name ({module}:{qual}); a check with nproc > 1 runs it in fresh "
            "processes: define it at module level of an importable module, or pass it as 'package.module:Class'"
        )
    return f"{module}:{qual}"


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _timing(key: str) -> bool:
    """Row keys that measure time (they differ between identical runs)."""
    return key.endswith("_s") or "seconds" in key or "time" in key


class _Probe:
    """A plugin watching each run: its first built run, the initial weights, the layout, the features' after_step
    returns; it stops a run at step ``stop_at`` the way Ctrl-C does (the interrupt flag: a checkpoint, then
    :class:`~dsk.train.context.RunInterrupted`)."""

    __name__ = "dsk_contract_probe"

    def __init__(self) -> None:
        self.stop_at: int | None = None
        #: called once with the built run after the first step (before any checkpoint is written), then cleared
        self.after_first_step: Callable[[Any], None] | None = None
        self.reset()

    def reset(self) -> None:
        self.built: Any = None
        self.initial: dict[str, Any] = {}
        self.layout: dict[str, Any] = {}
        self.returns: list[tuple[int, Any]] = []
        self.rows: list[dict[str, Any]] = []

    @hookimpl
    def on_run_built(self, ctx: Any, built: Any) -> None:
        if self.built is not None:  # a trainer's second run (a frozen reference)
            return
        self.built = built
        ctx.metrics.write = self._recording_rows(ctx.metrics.write)
        self.initial = {n: p.detach().clone() for n, p in built.base_model.named_parameters()}
        p = built.parallel
        self.layout = {k: getattr(p, k) for k in ("rank", "world_size", "is_writer", "data_rank", "data_world_size")}
        for feature in built.features:
            if "after_step" in feature.stages:
                feature.after_step = self._recording(feature.after_step)

    def _recording_rows(self, write: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        def recorded(row: dict[str, Any]) -> None:  # as given: the file holds a non-finite float as null
            self.rows.append(copy.deepcopy(row))
            write(row)

        return recorded

    def _recording(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def after_step(run: Any, step: int) -> Any:
            out = method(run, step)
            self.returns.append((step, out))
            return out

        return after_step

    @hookimpl
    def on_step_end(self, ctx: Any, step: int, metrics: dict[str, Any]) -> None:
        if self.after_first_step is not None and self.built is not None:
            check, self.after_first_step = self.after_first_step, None
            check(self.built)
        if self.stop_at is not None and step == self.stop_at and ctx.interrupt.signum is None:
            ctx.interrupt.signum = signal.SIGTERM


class _NullConsole:
    is_terminal = False

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Harness:
    """The component registered under ``name`` beside the built-ins, and in-process runs of recipes using it."""

    def __init__(self, kind: str, impl: Any, config: type | None, name: str, **options: Any):
        from dsk.api import NoConfig
        from dsk.registry import build_registry
        from dsk.testing import isolated_plugin_manager

        self.kind, self.name = kind, name
        self.config = config if config is not None else NoConfig
        plugin = types.SimpleNamespace(__name__=f"dsk_contract_{kind}")

        def hook(register: Any) -> None:
            register(kind, name, impl, config=self.config, **options)

        hook.__name__ = _HOOKS[kind]
        setattr(plugin, _HOOKS[kind], hookimpl(specname=_HOOKS[kind])(hook))
        self.probe = _Probe()
        # a built-in checked under its own name is already registered by its plugin: use that registration
        self.is_builtin = self.builtin(kind, name, impl, self.config)
        plugins = () if self.is_builtin else (plugin,)
        self.pm = isolated_plugin_manager(*plugins, self.probe)
        self.registry = build_registry(self.pm)
        failed = [f"{i.name}: {i.error}" for i in self.pm.failures()] + list(self.registry.errors)
        if failed:
            _fail(f"{kind} {name!r} could not be registered: {'; '.join(failed)}")

    @staticmethod
    def builtin(kind: str, name: str, impl: Any, config: type) -> bool:
        """Whether dsk's built-ins register ``impl`` with ``config`` as ``kind``/``name`` themselves."""
        from dsk.registry import ComponentSpec
        from dsk.testing import builtin_registry

        path = impl if isinstance(impl, str) else ComponentSpec(kind, name, impl, config, "", "").impl_path
        return any(s.name == name and s.impl_path == path and s.config is config for s in builtin_registry().all(kind))

    def validate(self, table: dict[str, Any]) -> Any:
        from dsk.recipe import Recipe, validate_recipe
        from dsk.recipe.errors import RecipeError

        try:
            return validate_recipe(Recipe(data=copy.deepcopy(table)), self.registry, self.pm, check=True)
        except RecipeError as exc:
            _fail(f"{self.kind} {self.name!r}: the tiny recipe using it does not validate: {exc}")

    def run(self, table: dict[str, Any], run_dir: Path, *, stop_at: int | None = None, resume: bool = False) -> Any:
        """Run ``table`` into ``run_dir``; returns ``(train rows, summary)``; with ``stop_at``, stops after that
        step as an interrupt does (the checkpoint it writes is what ``resume=True`` continues)."""
        from dsk.train.context import RunInterrupted
        from dsk.train.metrics import read_metrics
        from dsk.train.progress import Reporter
        from dsk.train.runner import run_recipe

        validated = self.validate(table)
        self.probe.reset()
        self.probe.stop_at = stop_at
        what = f"a tiny run with {self.kind} {self.name!r}" + (" resumed from its checkpoint" if resume else "")
        try:
            summary = run_recipe(
                validated, registry=self.registry, pm=self.pm, run_dir=run_dir, resume=resume,
                reporter=Reporter(_NullConsole(), enabled=False),
            )  # fmt: skip
        except RunInterrupted:
            if stop_at is None:
                raise
            summary = None
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}") from exc
        finally:
            self.probe.stop_at = None
        if stop_at is not None and summary is not None:
            _fail(f"{what}: an interrupt after step {stop_at} did not stop the run; the trainer must check it")
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
        return rows, summary


def _train_table(steps: int) -> dict[str, Any]:
    return {"trainer": {"steps": steps}}


def _check_losses(what: str, rows: list[dict[str, Any]], steps: int) -> list[float]:
    got = [r.get("step") for r in rows]
    if got != list(range(1, steps + 1)):
        _fail(f"{what}: metrics.jsonl has train rows for steps {got}, expected 1..{steps}")
    losses = [r.get("loss") for r in rows]
    for step, (row, loss) in enumerate(zip(rows, losses, strict=True), start=1):
        if not _real(loss) or not math.isfinite(loss) or row.get("skipped"):
            _fail(f"{what}: step {step} has loss {loss!r} (skipped: {row.get('skipped')}); every step must be finite")
    return losses


def _same_rows(a: list[dict[str, Any]], b: list[dict[str, Any]], keys: list[str] | None = None) -> str | None:
    """The first difference between two runs' rows (timings left out), or None."""
    for ra, rb in zip(a, b, strict=False):
        for key in keys if keys is not None else sorted(set(ra) | set(rb)):
            if _timing(key):
                continue
            if ra.get(key) != rb.get(key):
                return f"step {ra.get('step')}: {key} = {ra.get(key)!r} then {rb.get(key)!r}"
    if len(a) != len(b):
        return f"{len(a)} rows then {len(b)}"
    return None


def _state_value_problem(key: Any, value: Any) -> str | None:
    import torch

    if not isinstance(key, str):
        return f"key {key!r} is not a str"
    if isinstance(value, torch.Tensor):
        return None
    try:
        back = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        return f"{key!r} = {type(value).__name__} is neither a tensor nor a JSON value ({exc})"
    if back != value:
        return f"{key!r} = {value!r} changes through JSON (tuples? non-str keys?); use lists and str keys"
    return None


def _equal_states(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    import torch

    if set(a) != set(b):
        return f"keys {sorted(a)} then {sorted(b)}"
    for key in sorted(a):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or not torch.equal(
                x.detach().cpu(), y.detach().cpu()
            ):
                return f"{key!r} differs"
        elif x != y:
            return f"{key!r} = {x!r} then {y!r}"
    return None


@contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dsk-contract-") as d:
        yield Path(d)


# -- feature ---------------------------------------------------------------------------------------------------


def _check_feature_stages(cls: Any, name: str) -> tuple[str, ...]:
    from dsk.api import FEATURE_STAGES, Feature

    what = f"feature {name!r} ({getattr(cls, '__qualname__', cls)})"
    if not isinstance(cls, type) or not issubclass(cls, Feature):
        _fail(f"{what} is not a dsk.api.Feature subclass; subclass it (from dsk.api import Feature)")
    stages = tuple(getattr(cls, "stages", ()))
    if not stages:
        _fail(f"{what} lists no stages, so the build path never calls it; list the stages it acts in (stages = (...))")
    unknown = [s for s in stages if s not in FEATURE_STAGES]
    if unknown:
        _fail(f"{what} lists unknown stages {unknown}; the stages are {list(FEATURE_STAGES)}")
    if len(set(stages)) != len(stages):
        _fail(f"{what} lists a stage twice in stages = {stages}")

    def overrides(method: str) -> bool:
        return getattr(cls, method) is not getattr(Feature, method)

    methods = {s: (s,) for s in FEATURE_STAGES if s != "state"}
    methods["state"] = ("state_dict", "load_state_dict")
    for stage, names in methods.items():
        done = [m for m in names if overrides(m)]
        if stage in stages and len(done) != len(names):
            missing = [m for m in names if m not in done]
            _fail(
                f"{what} lists {stage!r} in stages but does not override {' and '.join(missing)}; implement "
                f"{' and '.join(missing)} or drop {stage!r} from stages"
            )
        if stage not in stages and done:
            _fail(
                f"{what} overrides {' and '.join(done)} but does not list it in stages, so the build path never "
                f"calls it; add {stage!r} to stages"
            )
    return stages


def check_feature(
    impl: Any,
    config: type | None = None,
    *,
    name: str = "contract_feature",
    table: dict[str, Any] | None = None,
    after: tuple[str, ...] = (),
    before: tuple[str, ...] = (),
    conflicts: tuple[str, ...] = (),
    steps: int = 4,
    recipe: dict[str, Any] | None = None,
) -> None:
    """The feature contract: ``impl(config)`` acting only in the stages it lists.

    Checks: ``stages`` is a non-empty subset of :data:`dsk.api.FEATURE_STAGES` and lists exactly the stage
    methods the class overrides (``"state"``: ``state_dict`` and ``load_state_dict``); the config round trip
    through TOML; a tiny run with ``[features.<name>]`` trains (finite losses, the parameters change); a second
    run with the same seed gives the same rows; ``after_step`` returns None or ``{str: finite number}``;
    ``state_dict()`` holds tensors and JSON values only and the checkpoint gives it back; a run stopped after
    ``steps // 2`` steps and resumed from its checkpoint (``--resume``: a fresh instance loaded with the state)
    gives the straight run's rows and final state.

    Args:
        impl: the class, or ``"package.module:Class"``, as given to ``register``.
        config: its pydantic config model (None: :class:`dsk.api.NoConfig`).
        name: the name it is registered under; ``table`` its ``[features.<name>]`` options.
        after, before, conflicts: the order declared to ``register``.
        steps: optimizer steps of each run (at least 2).
        recipe: sections merged over :func:`tiny_recipe` (e.g. another ``[model]``).
    """
    if steps < 2:
        _fail(f"check_feature: steps = {steps}; a resume needs at least 2 steps")
    table = dict(table or {})
    _check_feature_stages(_load(impl), name)
    from dsk.testing.contracts.model import check_config_round_trip

    h = _Harness("feature", impl, config, name, after=tuple(after), before=tuple(before), conflicts=tuple(conflicts))
    check_config_round_trip(h.config, table, registry=h.registry)
    what = f"feature {name!r}"
    full = _merge(tiny_recipe(), {**(recipe or {}), **_train_table(steps)})
    full["features"] = {name: {"type": name, **table}}
    with _workdir() as tmp:
        if "state" in getattr(_load(impl), "stages", ()):  # before the first checkpoint, which would choke on it
            h.probe.after_first_step = lambda built: _check_state_values(what, _feature(built, name))
        rows, _summary = h.run(full, tmp / "straight")
        _check_losses(f"a tiny run with {what}", rows, steps)
        built = h.probe.built
        feature = _feature(built, name)
        _check_trained(what, h.probe.initial, built.base_model)
        returns = list(h.probe.returns)
        _check_after_step_returns(what, returns, feature.stages, steps)
        final_state = None
        if "state" in feature.stages:
            final_state = _check_state(what, feature, tmp / "straight")

        again, _ = h.run(full, tmp / "again")
        diff = _same_rows(rows, again)
        if diff is not None or returns != h.probe.returns:
            diff = diff or "its after_step metrics differ"
            _fail(
                f"{what} is not deterministic: two runs with the same seed differ ({diff}); draw random numbers "
                "from torch's seeded RNG (never Python's random, time or os.urandom) and keep no state between runs"
            )

        k = steps // 2
        h.run(full, tmp / "resumed", stop_at=k)
        resumed, _ = h.run(full, tmp / "resumed", resume=True)
        diff = _same_rows(rows, resumed)
        if diff is not None:
            _fail(
                f"{what}: a run stopped after step {k} and resumed from its checkpoint differs from the straight run "
                f"({diff}); state_dict() must hold everything the feature's effect depends on, and "
                "load_state_dict() must restore it"
            )
        if final_state is not None:
            theirs = next(f for f in h.probe.built.features if f.name == name)
            diff = _equal_states(final_state, theirs.state_dict())
            if diff is not None:
                _fail(
                    f"{what}: after a resume its state_dict() ends unlike the straight run's ({diff}); "
                    "load_state_dict() must restore everything state_dict() returned"
                )


def _feature(built: Any, name: str) -> Any:
    feature = next((f for f in built.features if f.name == name), None)
    if feature is None:
        _fail(f"feature {name!r} is not among the run's features; the build path did not build it")
    return feature


def _check_state_values(what: str, feature: Any) -> dict[str, Any]:
    state = _call(f"{what}.state_dict()", feature.state_dict)
    if not isinstance(state, dict):
        _fail(f"{what}.state_dict() returned {type(state).__name__}; return a dict of tensors and JSON values")
    for key, value in state.items():
        problem = _state_value_problem(key, value)
        if problem is not None:
            _fail(f"{what}.state_dict(): {problem}; a checkpoint holds tensors (safetensors) and JSON values only")
    return state


def _check_trained(what: str, initial: dict[str, Any], model: Any) -> None:
    import torch

    changed = 0
    for n, p in model.named_parameters():
        if not torch.isfinite(p.detach()).all():
            _fail(f"a tiny run with {what}: parameter {n!r} is not finite after training")
        if n in initial and initial[n].shape == p.shape and not torch.equal(initial[n], p.detach()):
            changed += 1
    if not changed:
        _fail(
            f"a tiny run with {what} left every parameter as it was; the optimizer must still update the model "
            "(a wrapped optimizer must step the model's parameters)"
        )


def _check_after_step_returns(what: str, returns: list[tuple[int, Any]], stages: Any, steps: int) -> None:
    if "after_step" not in stages:
        return
    if [s for s, _ in returns] != list(range(1, steps + 1)):
        _fail(f"{what}.after_step ran at steps {[s for s, _ in returns]}, expected once per step 1..{steps}")
    for step, out in returns:
        if out is None:
            continue
        if not isinstance(out, dict):
            _fail(f"{what}.after_step returned {type(out).__name__} at step {step}; return None or {{str: float}}")
        for key, value in out.items():
            if not isinstance(key, str) or not _real(value) or not math.isfinite(value):
                _fail(
                    f"{what}.after_step returned {key!r}: {value!r} at step {step}; its metrics are "
                    "{str: finite float} (convert tensors with float())"
                )


def _check_state(what: str, feature: Any, run_dir: Path) -> dict[str, Any]:
    from dsk.train.checkpoint import load_checkpoint

    state = _check_state_values(what, feature)
    saved = load_checkpoint(run_dir).feature_state.get(feature.name)
    if saved is None:
        _fail(f"{what}: the final checkpoint holds no state of it; list 'state' in stages")
    diff = _equal_states(state, saved)
    if diff is not None:
        _fail(f"{what}: the checkpoint does not give back its state_dict() ({diff}); keep tensors and JSON values")
    return state


# -- parallel --------------------------------------------------------------------------------------------------


@contextmanager
def _world_of_one(tmp: Path) -> Iterator[None]:
    """A world-size-1 gloo default process group (unless one exists), destroyed on exit."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp / 'pg'}", rank=0, world_size=1)
        created = True
    try:
        yield
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _check_layout(what: str, layout: dict[str, Any], world: int, rank: int) -> None:
    r, w, dr, dw, writer = (layout.get(k) for k in ("rank", "world_size", "data_rank", "data_world_size",
                                                      "is_writer"))  # fmt: skip
    if w != world or r != rank:
        _fail(f"{what}: rank {r} of world_size {w} on process {rank} of {world}; take them from torch.distributed")
    if not isinstance(writer, bool):
        _fail(f"{what}: is_writer is {writer!r}; return a bool")
    if not (isinstance(dw, int) and dw >= 1 and world % dw == 0 and isinstance(dr, int) and 0 <= dr < dw):
        _fail(f"{what}: data_rank {dr} of data_world_size {dw} on {world} processes; 0 <= data_rank < "
              "data_world_size, which divides world_size")  # fmt: skip


def _close_losses(what: str, a: list[float], b: list[float], rtol: float, reference: str) -> None:
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        if abs(x - y) > rtol * abs(y):
            _fail(
                f"{what}: step {step} has loss {x!r}, {reference} {y!r} (rtol {rtol:g}); its reductions must give "
                "the one-process result: gradients averaged (not summed) over the data ranks, step statistics summed"
            )


def check_parallel(
    impl: Any,
    config: type | None = None,
    *,
    name: str = "contract_parallel",
    table: dict[str, Any] | None = None,
    nproc: int = 1,
    steps: int = 3,
    recipe: dict[str, Any] | None = None,
    rtol: float = 1e-5,
) -> None:
    """The parallel-strategy contract: ``impl(config)``, a :class:`dsk.api.ParallelStrategy`.

    Checks, ``nproc=1`` (in this process, in a world-size-1 gloo process group made for the check when none exists):
    the config round trip through TOML; rank, world size, writer and data slice consistent with the group; the
    losses of a tiny run with ``[parallel.<name>]`` equal those without it (within ``rtol``); a run stopped halfway
    and resumed from its checkpoint gives the straight run's rows. ``nproc=2``: the recipe through
    ``dsk train --nproc 2`` (torchrun, gloo): each rank's layout (one writer, consistent data slices) and losses
    equal to one process running the same global batch (within ``rtol``; ``impl`` must be importable by name).
    """
    table = dict(table or {})
    if steps < 2:
        _fail(f"check_parallel: steps = {steps}; a resume needs at least 2 steps")
    from dsk.testing.contracts.model import check_config_round_trip

    h = _Harness("parallel", impl, config, name)
    check_config_round_trip(h.config, table, registry=h.registry)
    what = f"parallel strategy {name!r}"
    base = _merge(tiny_recipe(), {**(recipe or {}), **_train_table(steps)})
    full = copy.deepcopy(base)
    full["parallel"] = {name: {"type": name, **table}}
    with _workdir() as tmp:
        if nproc > 1:
            _check_parallel_ranks(h, impl, base, full, nproc, tmp, what, rtol)
            return
        with _world_of_one(tmp):
            ref, _ = h.run(base, tmp / "reference")
            rows, _ = h.run(full, tmp / "straight")
            losses = _check_losses(f"a tiny run with {what}", rows, steps)
            _check_layout(what, h.probe.layout, 1, 0)
            if not h.probe.layout["is_writer"]:
                _fail(f"{what}: the only rank is not the writer; a run must have exactly one writing rank")
            _close_losses(f"a tiny run with {what}", losses, [r["loss"] for r in ref], rtol, "one process without it")
            k = steps // 2
            h.run(full, tmp / "resumed", stop_at=k)
            resumed, _ = h.run(full, tmp / "resumed", resume=True)
            diff = _same_rows(rows, resumed)
            if diff is not None:
                _fail(
                    f"{what}: a run stopped after step {k} and resumed from its checkpoint differs from the straight "
                    f"run ({diff}); its checkpoint methods must save and load the whole model and optimizer state"
                )


_RANK_REGISTER = """\
from {config_module} import {config_name} as Config


@hookimpl
def register_parallel_strategies(register):
    register("parallel", {name!r}, {impl!r}, config=Config)
"""

_RANK_PLUGIN = """\
import json, os
from dsk import hookimpl
{register}

@hookimpl
def on_run_built(ctx, built):
    p = built.parallel
    layout = {{k: getattr(p, k) for k in ("rank", "world_size", "is_writer", "data_rank", "data_world_size")}}
    with open(os.path.join({out!r}, f"rank-{{os.environ.get('RANK', '0')}}.json"), "w") as f:
        json.dump(layout, f)
"""


def _check_parallel_ranks(h: _Harness, impl: Any, base: dict, full: dict, nproc: int, tmp: Path, what: str,
                          rtol: float) -> None:  # fmt: skip
    """``dsk train --nproc N`` with the strategy, against one process on the same global batch."""
    import tomli_w

    from dsk.testing.contracts.model import _env_with_path

    layouts = tmp / "layouts"
    layouts.mkdir()
    cfg = h.config
    plugin = tmp / "contract_parallel_plugin.py"
    register = (
        ""
        if h.is_builtin
        else _RANK_REGISTER.format(
            config_module=cfg.__module__, config_name=cfg.__qualname__, name=h.name, impl=_impl_path(impl)
        )
    )
    plugin.write_text(_RANK_PLUGIN.format(register=register, out=str(layouts)))
    recipe_path = tmp / "recipe.toml"
    recipe_path.write_text(tomli_w.dumps(full), encoding="utf-8")
    run_dir = tmp / "ranks"
    env = _env_with_path()
    env.update(DSK_LOAD_PLUGINS="dsk", DSK_DIST_TIMEOUT_S="60")
    cmd = [sys.executable, "-m", "dsk", "--plugin", str(plugin), "train", str(recipe_path), "--nproc", str(nproc),
           "--run-dir", str(run_dir)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp))
    if done.returncode != 0:
        _fail(f"dsk train --nproc {nproc} with {what} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    found = sorted(layouts.glob("rank-*.json"))
    if len(found) != nproc:
        _fail(f"dsk train --nproc {nproc} with {what}: {len(found)} ranks built the run, expected {nproc}")
    per = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in found}  # by the launcher's RANK
    for rank, layout in sorted(per.items()):
        _check_layout(f"{what} on {nproc} processes", layout, nproc, rank)
    writers = [r for r, d in per.items() if d["is_writer"]]
    if len(writers) != 1:
        _fail(f"{what} on {nproc} processes: ranks {writers} are writers; exactly one rank writes the run directory")
    dws = {d["data_world_size"] for d in per.values()}
    if len(dws) != 1:
        _fail(f"{what} on {nproc} processes: the ranks disagree on data_world_size ({sorted(dws)})")
    dw = dws.pop()
    from dsk.train.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    steps = full["trainer"]["steps"]
    losses = _check_losses(f"dsk train --nproc {nproc} with {what}", rows, steps)
    one = copy.deepcopy(base)
    one["trainer"]["batch_size"] = base["trainer"]["batch_size"] * dw  # the same global batch
    ref, _ = h.run(one, tmp / "reference")
    _close_losses(f"dsk train --nproc {nproc} with {what}", losses, [r["loss"] for r in ref], rtol,
                  f"one process on the global batch of {dw} data ranks")  # fmt: skip


# -- trainer ---------------------------------------------------------------------------------------------------


def check_trainer(
    impl: Any,
    config: type | None = None,
    *,
    name: str = "contract_trainer",
    table: dict[str, Any] | None = None,
    steps: int = 3,
    recipe: dict[str, Any] | None = None,
) -> None:
    """The trainer contract: ``impl(config).run(ctx)`` runs a stage on the shared build path and loop.

    Checks: the config round trip through TOML; ``[trainer] type = <name>`` with ``table`` (``steps`` defaults to
    ``steps``) on the tiny recipe completes; it writes train rows to ``metrics.jsonl`` whose numbers are all finite
    (the writer stores a non-finite float as null); ``summary.json`` says the stage completed; a second run with the
    same seed writes the same rows (timings left out).
    """
    table = {"steps": steps, **(table or {})}
    from dsk.testing.contracts.model import check_config_round_trip

    h = _Harness("trainer", impl, config, name)
    check_config_round_trip(h.config, table, registry=h.registry)
    what = f"trainer {name!r}"
    full = _merge(tiny_recipe(), recipe or {})
    full["trainer"] = {"type": name, **table}
    with _workdir() as tmp:
        rows, summary = h.run(full, tmp / "first")
        _check_trainer_rows(what, rows, [r for r in h.probe.rows if r.get("kind") == "train"])
        _check_summary(what, tmp / "first", summary)
        again, _ = h.run(full, tmp / "again")
        diff = _same_rows(rows, again)
        if diff is not None:
            _fail(
                f"{what} is not deterministic: two runs with the same seed wrote different metrics ({diff}); seed "
                "every random draw (sampling included) from ctx.seed and keep no state between runs"
            )


def _check_trainer_rows(what: str, rows: list[dict[str, Any]], raw: list[dict[str, Any]]) -> None:
    """``rows`` as read from metrics.jsonl, ``raw`` as the trainer handed them to the writer (which stores a
    non-finite float as null; a None the trainer gave means "does not apply" and is allowed)."""
    if not rows:
        _fail(f"{what} wrote no train rows to metrics.jsonl; write one row per optimizer step (kind = 'train')")
    given = {r.get("step"): r for r in raw}
    for row in [*raw, *rows]:
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            _fail(f"{what} wrote a train row without an int step: {row}")
        for key, value in row.items():
            nonfinite = _real(value) and not math.isfinite(value)
            if nonfinite or (value is None and given.get(step, {}).get(key, 0.0) is not None):
                _fail(
                    f"{what} wrote {key} = {value if nonfinite else 'null (a non-finite value)'} at step {step}; "
                    "every metric must be a finite number (None where it does not apply; a step whose loss is not "
                    "finite is skipped, not logged as NaN)"
                )


def _check_summary(what: str, run_dir: Path, summary: Any) -> None:
    path = run_dir / "summary.json"
    if not path.is_file():
        _fail(f"{what}: the run wrote no summary.json; return the stage summary from run(ctx)")
    data = json.loads(path.read_text(encoding="utf-8"))
    stages = data.get("stages") or [{}]
    if data.get("status") != "completed" or stages[0].get("status") != "completed":
        _fail(f"{what}: summary.json says {data.get('status')!r} / {stages[0].get('status')!r}, expected completed")
    if not isinstance(summary, dict):
        _fail(f"{what}: the run returned {type(summary).__name__}, not a summary dict")
