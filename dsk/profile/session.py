"""One recipe's measurement for ``dsk profile``: a plugin object that watches a normal training run through the
run-time hooks (``on_run_built``, ``on_component_metrics``, ``on_step_end``) and measures it in phases.

With ``W`` warm-up and ``N`` measured steps, the run trains ``W + 2N`` steps:

* step ``W - 1`` (when ``W >= 2``): the bytes each training forward leaves alive for its backward
  (:class:`dsk.profile.activations.StorageTracker`, installed by forward hooks on the model);
* step ``W``: the matrix-product FLOPs of the whole step as torch counts them (``FlopCounterMode``);
* steps ``W+1 .. W+N``: the measured steps, unprofiled: step time, tokens/s, each MoE layer's per-expert load and
  MaxVio (the router's own statistic, read before the bias update resets it);
* steps ``W+N+1 .. W+2N``: the same steps under ``torch.profiler``, with every :class:`dsk.api.Profiled` feature
  and strategy recording; time by component (:mod:`dsk.profile.attribution`), the Chrome trace, the components'
  reports, and the memory held after the last step (parameters, gradients, optimizer state).

The profiler's cost per recorded op is what the profiled steps took longer than the unprofiled ones, divided by the
ops it recorded per step; it is taken out of each part per op recorded there (a part of many small ops pays more of
it than one big GEMM). The corrected parts then add up to the unprofiled step by construction, up to the loop's time
between steps and the two phases' noise: the number to judge the attribution by is the raw overhead, printed.

Nothing here names a technique: the parts, loads and reports are what the components give.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dsk._markers import hookimpl
from dsk.api import Profiled
from dsk.profile.activations import StorageTracker, _tensors
from dsk.profile.attribution import attribute_time

__all__ = ["ProfileSession"]


def _nbytes(tensors: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard: this rank's bytes
        key = local.untyped_storage().data_ptr()
        if key in seen and key != 0:
            continue
        seen.add(key)
        total += local.untyped_storage().nbytes()
    return total


def _optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Every tensor of an optimizer's state (wrappers such as ZeRO's or an offload's included, through
    ``state_dict``'s ``state``, which holds this rank's own)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [optimizer]
    while stack:
        opt = stack.pop()
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        state = getattr(opt, "state", None)
        if isinstance(state, Mapping):
            for value in state.values():
                out += [v for v in (value.values() if isinstance(value, dict) else []) if isinstance(v, torch.Tensor)]
        for name in ("inner", "local", "zero", "optim", "optimizer"):
            inner = getattr(opt, name, None)
            if inner is not None and hasattr(inner, "state"):
                stack.append(inner)
    return out


def _positions(args: Any) -> int:
    """B x T of a model forward's first argument (token ids [B, T], or a pipeline stage's hidden [B, T, D])."""
    x = args[0] if args else None
    return int(x.shape[0] * x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0


def _leaves(parallel: Any) -> list[Any]:
    inner = getattr(parallel, "strategies", None)
    return list(inner) if inner else [parallel]


class ProfileSession:
    """Measures one run in the phases of the module docstring; :meth:`report` returns what it found."""

    def __init__(self, warmup: int, steps: int, trace_path: Path | None):
        self.warmup, self.steps = warmup, steps
        self.trace_path = trace_path
        self.built: Any = None
        self.rows: list[dict[str, Any]] = []
        self.loads: dict[str, list[float]] = {}
        self.maxvio: dict[str, list[float]] = {}
        #: (bytes, positions) of each training forward of step W - 1
        self.activation_bytes: list[tuple[int, int]] = []
        self._positions = 0
        self.counted_flops: float | None = None
        #: the positions (B x T of every training forward) of the FLOP-counted step W
        self.flop_positions = 0
        #: the positions of the training forwards of the measured steps (the tokens the routers routed)
        self.measured_positions = 0
        self.parts: dict[str, float] = {}
        self.window_s = 0.0
        self.reports: dict[str, Any] = {}
        self.memory: dict[str, int] = {}
        self._flop_mode: Any = None
        self._hooks: list[Any] = []
        self._tracker: StorageTracker | None = None
        self._prof: Any = None
        self._window_start = 0.0
        self.device = "cpu"
        #: the profiler's cost per recorded op: the profiled steps' extra time over the unprofiled ones, per op
        self.per_event_s = 0.0
        self.attribution: Any = None

    # -- the hooks ---------------------------------------------------------------------------------------------
    @hookimpl
    def on_run_built(self, ctx: Any, built: Any) -> None:
        if self.built is None and built.optimizer is not None:  # the run that trains, not a frozen reference
            self.built = built
            self.device = str(ctx.device)
            self._before_step(1)

    @hookimpl
    def on_component_metrics(self, ctx: Any, step: int, metrics: dict[str, Any]) -> None:
        if not self.warmup < step <= self.warmup + self.steps:
            return
        for key, value in metrics.items():
            path, _, metric = key.rpartition(".")
            if "/" in key or not path:
                continue
            if metric == "expert_load" and isinstance(value, list):
                total = self.loads.setdefault(path, [0.0] * len(value))
                for i, v in enumerate(value):
                    total[i] += float(v)
            elif metric == "maxvio" and not isinstance(value, list):
                self.maxvio.setdefault(path, []).append(float(value))

    @hookimpl
    def on_step_end(self, ctx: Any, step: int, metrics: dict[str, Any]) -> None:
        self._after_step(step, metrics)
        self._before_step(step + 1)

    # -- the phases --------------------------------------------------------------------------------------------
    def _before_step(self, step: int) -> None:
        W, N = self.warmup, self.steps
        if W >= 2 and step == W - 1:
            self._track_activations()
        elif W >= 1 and step == W:
            from torch.utils.flop_counter import FlopCounterMode

            self._flop_mode = FlopCounterMode(display=False)
            self._flop_mode.__enter__()

            def count(module: Any, args: Any) -> None:
                if torch.is_grad_enabled():
                    self.flop_positions += _positions(args)

            self._hooks = [self.built.base_model.register_forward_pre_hook(count)]
        elif step == W + 1:

            def count(module: Any, args: Any) -> None:
                if torch.is_grad_enabled():
                    self.measured_positions += _positions(args)

            self._hooks = [self.built.base_model.register_forward_pre_hook(count)]
        elif step == W + N + 1:
            self._start_profiler()

    def _after_step(self, step: int, metrics: dict[str, Any]) -> None:
        W, N = self.warmup, self.steps
        if W >= 2 and step == W - 1:
            self._untrack_activations()
        elif W >= 1 and step == W and self._flop_mode is not None:
            self._flop_mode.__exit__(None, None, None)
            self.counted_flops = float(self._flop_mode.get_total_flops())
            self._flop_mode = None
            self._untrack_activations()  # the position counter
        if step == W + N:
            self._untrack_activations()  # the position counter
        if step > W:
            self.rows.append({k: metrics.get(k) for k in ("step", "step_s", "tokens", "loss")})
        if step == W + 2 * N:
            self._stop_profiler()

    # saved activations: a forward hook pair on the model, one forward at a time
    def _track_activations(self) -> None:
        model = self.built.base_model

        def pre(module: Any, args: Any) -> None:
            if torch.is_grad_enabled() and self._tracker is None:
                self._positions = _positions(args)
                self._tracker = StorageTracker()
                self._tracker.__enter__()

        def post(module: Any, args: Any, output: Any) -> None:
            tracker, self._tracker = self._tracker, None
            if tracker is None:
                return
            tracker.__exit__(None, None, None)
            gc.collect()
            exclude = _tensors(output) + list(model.parameters()) + list(model.buffers())
            self.activation_bytes.append((tracker.alive(exclude)[0], self._positions))

        self._hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]

    def _untrack_activations(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracker = None

    def _profiled(self) -> list[tuple[str, Any]]:
        built = self.built
        out = [(f.name or type(f).__name__, f) for f in built.features if isinstance(f, Profiled)]
        out += [("parallel", s) for s in _leaves(built.parallel) if isinstance(s, Profiled)]
        return out

    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        for _, component in self._profiled():
            component.profile_start()
        activities = [ProfilerActivity.CPU]
        if self.device.startswith("cuda") and torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.reset_peak_memory_stats()
        self._prof = profile(activities=activities, record_shapes=False, with_stack=False, profile_memory=False)
        self._prof.__enter__()
        self._window_start = time.perf_counter()

    def _stop_profiler(self) -> None:
        if self._prof is None:
            return
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.window_s = time.perf_counter() - self._window_start
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        events = prof.events()
        N = self.steps
        measured = [r["step_s"] for r in self.rows[:N] if r.get("step_s")]
        profiled = [r["step_s"] for r in self.rows[N : 2 * N] if r.get("step_s")]
        recorded = attribute_time(events, self.window_s * 1e6).events
        ops_per_step = sum(recorded.values()) / N
        if measured and profiled and ops_per_step:
            extra = sum(profiled) / len(profiled) - sum(measured) / len(measured)
            self.per_event_s = max(0.0, extra / ops_per_step)
        self.attribution = attribute_time(events, self.window_s * 1e6, self.per_event_s)
        self.parts = self.attribution.seconds
        if self.trace_path is not None and self.built.parallel.is_writer:
            self.trace_path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(self.trace_path))
        for name, component in self._profiled():
            report = component.profile_report()
            if name == "parallel" and "parallel" in self.reports:
                self.reports["parallel"].update(report)
            else:
                self.reports[name] = report
        self._measure_memory()

    def _measure_memory(self) -> None:
        built = self.built
        params = list(built.model.parameters())
        self.memory = {
            "params_bytes": _nbytes(params),
            "grads_bytes": _nbytes(p.grad for p in params if p.grad is not None),
            "optimizer_state_bytes": _nbytes(_optimizer_tensors(built.optimizer)),
        }
        if self.device.startswith("cuda") and torch.cuda.is_available():
            self.memory["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
