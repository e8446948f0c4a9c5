"""``dsk profile RECIPE [RECIPE ...]``: where a training step's time, memory and FLOPs go, measured on this machine.

Each recipe is built and trained exactly as ``dsk train`` would (the same build path, strategies and features), in
a scratch run directory that is deleted afterwards, for ``--warmup`` steps and twice ``--steps`` measured steps
(unprofiled, then under ``torch.profiler``: :mod:`dsk.profile.session` says what each phase measures). Evaluation and
interval checkpoints are switched off. ``--out`` receives ``report.json``, the Chrome trace and the plots.

The report puts the measured numbers next to the analytic ones the components state (:mod:`dsk.model.cost`): FLOPs
per token and the model FLOP utilisation against a matmul peak measured here at the start
(:mod:`dsk.profile.peak`), saved-activation and KV-cache bytes, and the profiler's own overhead. Several recipes are
compared side by side, with ratios to the first.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from dsk.cli.common import (
    DskUsageError,
    check_launch,
    echo_json,
    load_and_validate,
    nproc_option,
    recipe_options,
    stderr_console,
    stdout_console,
)

__all__ = ["profile"]


def _label(recipe: str, seen: set[str]) -> str:
    label = Path(recipe).stem
    n = 2
    while label in seen:
        label = f"{Path(recipe).stem}-{n}"
        n += 1
    seen.add(label)
    return label


def _validated(ctx: click.Context, recipe: str, configs, sets, unsets, warmup: int, steps: int) -> Any:
    """The recipe with its trainer set to warm-up + 2 x steps steps and evaluation and interval checkpoints off."""
    result = load_and_validate(ctx, recipe, configs, sets, unsets, require=("model", "trainer"))
    if result.stages:
        raise DskUsageError(
            f"{recipe}: dsk profile measures one trainer, and this recipe has {len(result.stages)} [[stages]]; "
            "profile the recipe of one stage (its trainer as the top-level [trainer])"
        )
    fields = getattr(type(result.resolved["trainer"].config), "model_fields", {})
    extra = [f"trainer.steps={warmup + 2 * steps}"]
    extra += [f"trainer.{key}=0" for key in ("eval_every", "eval_samples") if key in fields]
    if getattr(result.resolved.get("checkpoint"), "every", None):
        extra.append("checkpoint.every=0")
    return load_and_validate(ctx, recipe, configs, (*sets, *extra), unsets, require=("model", "trainer"))


@click.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Measured steps (run twice: unprofiled for the times, then under torch.profiler).")  # fmt: skip
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Steps before measuring (the last two also count saved activations and FLOPs).")  # fmt: skip
@click.option("--out", type=click.Path(file_okay=False), help="Report, trace and plots (default runs/profile-<time>).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--scratch", hidden=True, type=click.Path(file_okay=False), help="(internal) the ranks' scratch dir")
@nproc_option
@recipe_options
@click.pass_context
def profile(ctx, recipes, steps, warmup, out, as_json, scratch, nproc, configs, sets, unsets) -> None:
    """Measure time by component, FLOPs/MFU, memory, expert load (and bubbles) of one or more RECIPES.

    \b
      dsk profile recipes/quickstart.toml
      dsk profile recipes/quickstart.toml --set model.attention.type=mha recipes/quickstart.toml --json
      dsk profile recipes/dualpipe.toml --nproc 2
    """
    from dsk.cli import common
    from dsk.train.context import launch_rank
    from dsk.train.distributed import distributed_env

    validated = [(r, _validated(ctx, r, configs, sets, unsets, warmup, steps)) for r in recipes]
    out_dir = Path(out) if out else Path("runs") / time.strftime("profile-%Y%m%d-%H%M%S")
    if nproc > 1 and not distributed_env():
        from dsk.cli.run_cmd import _without_nproc
        from dsk.train.distributed import launch

        for _, result in validated:
            check_launch(ctx, result, nproc, f"--nproc {nproc}")
        scratch_dir = tempfile.mkdtemp(prefix="dsk-profile-")
        argv = _without_nproc(list(common.INVOCATION_ARGV if common.INVOCATION_ARGV is not None else sys.argv[1:]))
        argv += ["--scratch", scratch_dir] + ([] if out else ["--out", str(out_dir)])
        try:
            code = launch(nproc, argv, console=stderr_console())
        finally:
            shutil.rmtree(scratch_dir, ignore_errors=True)
        if code:
            raise SystemExit(code)
        return

    own_scratch = scratch is None
    scratch_dir = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="dsk-profile-"))
    writer = launch_rank() == 0
    err = stderr_console()
    reports: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        peak = _peak(validated[0][1])
        for recipe, result in validated:
            label = _label(recipe, seen)
            if writer and not as_json:
                err.print(f"[dim]profiling {label}: {warmup} warm-up + {steps} + {steps} profiled steps[/]")
            reports.append(
                _profile_one(ctx, recipe, label, result, warmup, steps, out_dir, scratch_dir / label, peak, err)
            )
    finally:
        if own_scratch:
            shutil.rmtree(scratch_dir, ignore_errors=True)
    if not writer:
        return
    payload: dict[str, Any] = reports[0] if len(reports) == 1 else {"recipes": reports, "ratios": _ratios(reports)}
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _plots(reports, out_dir, err)
    payload["files"] = {"report": str(out_dir / "report.json"), **plots, **payload.get("files", {})}
    (out_dir / "report.json").write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    if as_json:
        echo_json(json.loads(json.dumps(payload, default=_jsonable)))
        return
    _print(reports, payload, out_dir)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _peak(result: Any) -> dict[str, Any]:
    """The matmul peak of this machine, measured with the first recipe's thread count and device."""
    import torch

    from dsk.profile.peak import measure_matmul_peak

    trainer = result.resolved["trainer"].config
    device = _device(getattr(trainer, "device", "auto"))
    threads = torch.get_num_threads()
    wanted = getattr(trainer, "cpu_threads", None)
    if wanted:
        torch.set_num_threads(wanted)
    try:
        return measure_matmul_peak(device)
    finally:
        torch.set_num_threads(threads)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _profile_one(ctx: click.Context, recipe: str, label: str, result: Any, warmup: int, steps: int, out_dir: Path,
                 scratch: Path, peak: dict[str, Any], err: Any) -> dict[str, Any]:  # fmt: skip
    from dsk.cli.run_cmd import _run
    from dsk.profile.session import ProfileSession

    app = ctx.find_root().obj
    pm = app.plugin_manager()
    trace = out_dir / label / "trace.json"
    session = ProfileSession(warmup, steps, trace)
    pm.register(session, name=f"dsk-profile-{label}")
    try:
        summary = _run(app, result, recipe, scratch, False, None, err, (0.0, 0), "dsk profile")
    finally:
        pm.unregister(session)
    return _report(label, recipe, result, session, summary, peak, trace)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _analytic(result: Any, session: Any) -> dict[str, Any]:
    """The components' own costs on a meta-device copy of the recipe's model (a pipeline rank holds only its stages;
    the cost is the whole model's), and the saved activations per token with the recipe's features applied (their
    activation dtype, their recomputation: the estimate ``dsk plan`` and the fit check use)."""
    from dsk.model.cost import model_cost
    from dsk.train.fit import estimate_run, meta_model, seq_len_of

    resolved = result.resolved
    vocab = session.built.base_model.vocab_size
    model = meta_model(resolved, vocab)
    estimate = estimate_run(resolved, session.built.parallel.world_size, model=model, vocab_size=vocab)
    act = estimate.act_bytes
    cost = model_cost(model, seq_len_of(resolved), act_bytes=int(act))
    cost["activation_bytes_per_token_with_features"] = sum(
        p.activation_bytes(act, estimate.recompute, estimate.recomputed_regions) for p in estimate.parts
    )
    return cost


def _report(label: str, recipe: str, result: Any, session: Any, summary: dict[str, Any], peak: dict[str, Any],
            trace: Path) -> dict[str, Any]:  # fmt: skip
    built = session.built
    N = session.steps
    measured = session.rows[:N]
    profiled = session.rows[N : 2 * N]
    step_s = _mean([r["step_s"] for r in measured])
    step_s_prof = _mean([r["step_s"] for r in profiled])
    tokens = sum(int(r["tokens"] or 0) for r in measured)
    tokens_per_s = tokens / sum(r["step_s"] for r in measured) if measured else None
    world = built.parallel.world_size
    trainer = result.resolved["trainer"].config
    cost = _analytic(result, session)
    flops_per_token = float(cost["training_flops_per_token"])
    peak_total = float(peak["flops_per_s"]) * world
    per_step = {k: v / N for k, v in sorted(session.parts.items(), key=lambda kv: -kv[1])}
    saved, positions = max(session.activation_bytes) if session.activation_bytes else (None, 0)
    whole = not built.parallel.holds_part_of_model  # a pipeline rank's forward runs its stages only
    kv_measured = _kv_bytes_per_token(built, int(getattr(trainer, "seq_len", 0) or 0))
    loads = {path.removesuffix(".mlp").removesuffix(".ffn"): v for path, v in session.loads.items()}
    maxvio = {path.removesuffix(".mlp").removesuffix(".ffn"): _mean(v) for path, v in session.maxvio.items()}
    report: dict[str, Any] = {
        "label": label,
        "recipe": recipe,
        "world_size": world,
        "warmup_steps": session.warmup,
        "measured_steps": N,
        "step_s": step_s,
        "tokens_per_step": tokens / N if N else None,
        "positions_per_step": session.measured_positions / N if N else None,
        "tokens_per_s": tokens_per_s,
        "step_s_profiled": step_s_prof,
        "profiler_overhead": (step_s_prof / step_s - 1.0) if step_s and step_s_prof else None,
        "components_s_per_step": per_step,
        "components_sum_s": sum(per_step.values()),
        "components_raw_s_per_step": {k: v / N for k, v in session.attribution.raw_seconds.items()},
        "components_device_s_per_step": {k: v / N for k, v in session.attribution.device_seconds.items()},
        "profiled_events_per_step": sum(session.attribution.events.values()) / N,
        "components_events_per_step": {k: v / N for k, v in session.attribution.events.items()},
        "profiler_cost_per_event_s": session.per_event_s,
        "components_vs_unprofiled_step": sum(per_step.values()) / step_s if step_s else None,
        "components_raw_vs_unprofiled_step": sum(session.attribution.raw_seconds.values()) / N / step_s
        if step_s
        else None,
        "flops_per_token": flops_per_token,
        "forward_flops_per_token": cost["flops_per_token"],
        "flops_convention": "analytic, matrix products only, training = 3 x forward (dsk.model.cost.CONVENTIONS)",
        "flops_per_position_counted": (session.counted_flops / session.flop_positions)
        if session.counted_flops and session.flop_positions
        else None,
        "peak_flops": peak_total,
        "peak": peak,
        "achieved_flops": flops_per_token * tokens_per_s if tokens_per_s else None,
        "mfu": flops_per_token * tokens_per_s / peak_total if tokens_per_s and peak_total else None,
        "params_total": cost["params_total"],
        "active_params_with_embeddings": cost["active_params_with_embeddings"],
        "memory": {
            **session.memory,
            "saved_activation_bytes": saved,
            "saved_activation_positions": positions,
            "saved_activation_bytes_analytic": cost["activation_bytes_per_token_with_features"] * positions
            if positions and whole
            else None,
            "kv_cache_bytes_per_token": kv_measured,
            "kv_cache_bytes_per_token_analytic": cost["kv_bytes_per_token"],
            "act_bytes": cost["act_bytes"],
        },
        "expert_load": loads,
        "maxvio": maxvio,
        "maxvio_mean": _mean([v for v in maxvio.values() if v is not None]),
        "final_loss": summary.get("last_loss") if isinstance(summary, dict) else None,
        "files": {"trace": str(trace)},
    }
    for name, component in session.reports.items():
        report[name] = component
    report["component_reports"] = sorted(session.reports)
    return report


def _kv_bytes_per_token(built: Any, seq_len: int) -> float | None:
    """The bytes of the KV cache the model's attention makes for one row of ``seq_len`` tokens, per token."""
    model = built.base_model
    make = getattr(model, "make_caches", None)
    if make is None or seq_len < 1:
        return None
    try:
        caches = make(1, seq_len)
    except Exception:  # noqa: BLE001 - a pipeline rank's placeholders hold no attention to make a cache of
        return None
    from dsk.profile.activations import _tensors

    tensors: list[Any] = []
    for cache in caches:
        tensors += _tensors(vars(cache)) if hasattr(cache, "__dict__") else _tensors(cache)
    from dsk.profile.session import _nbytes

    return _nbytes(tensors) / seq_len


_RATIO_KEYS = ("step_s", "tokens_per_s", "mfu", "flops_per_token", "maxvio_mean")


def _ratios(reports: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each later recipe's numbers over the first's."""
    first = reports[0]
    out: dict[str, dict[str, float | None]] = {}
    for r in reports[1:]:
        row: dict[str, float | None] = {}
        for key in _RATIO_KEYS:
            a, b = first.get(key), r.get(key)
            row[key] = b / a if a and b is not None else None
        for key in ("saved_activation_bytes", "kv_cache_bytes_per_token", "params_bytes"):
            a, b = first["memory"].get(key), r["memory"].get(key)
            row[key] = b / a if a and b is not None else None
        out[r["label"]] = row
    return out


def _plots(reports: list[dict[str, Any]], out_dir: Path, err: Any) -> dict[str, str]:
    """The PNGs (matplotlib: the optional extra dsk[profile]); a notice when it is missing."""
    try:
        from dsk.profile import plots
    except ImportError as exc:  # pragma: no cover - the module itself imports no matplotlib
        err.print(f"[yellow]no plots:[/] {exc}")
        return {}
    files: dict[str, str] = {}
    try:
        rows = {r["label"]: r["components_s_per_step"] for r in reports}
        files["components_plot"] = str(plots.component_times(rows, out_dir / "components.png", "time per step"))
        for r in reports:
            if r["expert_load"]:
                path = out_dir / r["label"] / "expert_load.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                files[f"expert_load_plot/{r['label']}"] = str(
                    plots.expert_load_heatmap(r["expert_load"], path, f"{r['label']}: expert load / mean")
                )
            timeline = (r.get("parallel") or {}).get("timeline")
            if timeline:
                path = out_dir / r["label"] / "pipeline.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                files[f"pipeline_plot/{r['label']}"] = str(
                    plots.pipeline_timeline(
                        timeline, path, f"{r['label']}: executed schedule", bubble=r["parallel"].get("bubble")
                    )
                )
    except ImportError as exc:
        err.print(f"[yellow]no plots:[/] {exc}")
    return files


# -- the printed report ----------------------------------------------------------------------------------------------
def _fmt_s(v: float | None) -> str:
    return "-" if v is None else (f"{v * 1e3:.1f} ms" if v < 10 else f"{v:.1f} s")


def _fmt_bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= size:
            return f"{v / size:.2f} {unit}"
    return f"{v:.0f} B"


def _fmt_num(v: float | None, fmt: str = ".3g") -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    m = r["memory"]
    rows = [
        ("step time (unprofiled)", _fmt_s(r["step_s"])),
        ("tokens/s", _fmt_num(r["tokens_per_s"], ",.0f")),
        ("step time under the profiler", _fmt_s(r["step_s_profiled"])),
        ("profiler overhead", _pct(r["profiler_overhead"])),
        (
            "profiler cost per op",
            f"{r['profiler_cost_per_event_s'] * 1e6:.2f} us x {r['profiled_events_per_step']:,.0f} ops",
        ),  # fmt: skip
    ]
    total = r["components_sum_s"] or 0.0
    raw = r.get("components_raw_s_per_step") or {}
    rows.append(("time by component (raw: as profiled)", ""))
    for name, seconds in r["components_s_per_step"].items():
        share = _pct(seconds / total if total else None)
        rows.append((f"  {name}", f"{_fmt_s(seconds)}  {share}  (raw {_fmt_s(raw.get(name))})"))
    device = r.get("components_device_s_per_step") or {}
    device_total = sum(device.values())
    for name, seconds in sorted(device.items(), key=lambda kv: -kv[1]):
        rows.append((f"  GPU kernels: {name}", f"{_fmt_s(seconds)}  {_pct(seconds / device_total)}"))
    rows += [
        ("raw components / unprofiled step", _fmt_num(r["components_raw_vs_unprofiled_step"], ".3f")),
        ("components / unprofiled step", _fmt_num(r["components_vs_unprofiled_step"], ".3f")),
        ("FLOPs/token (training), analytic", _fmt_num(r["flops_per_token"], ".4g")),
        ("FLOPs/position, torch counted", _fmt_num(r["flops_per_position_counted"], ".4g")),
        (
            f"matmul peak ({r['peak']['dtype']}, {r['peak'].get('threads', '?')} thr x {r['world_size']})",
            f"{r['peak_flops'] / 1e9:.1f} GFLOP/s",
        ),  # fmt: skip
        ("achieved", _fmt_num(r["achieved_flops"] and r["achieved_flops"] / 1e9, ".2f") + " GFLOP/s"),
        ("MFU (vs the measured peak)", _pct(r["mfu"])),
        ("parameters", _fmt_bytes(m.get("params_bytes"))),
        ("gradients", _fmt_bytes(m.get("grads_bytes"))),
        ("optimizer state", _fmt_bytes(m.get("optimizer_state_bytes"))),
        ("saved activations, measured", _fmt_bytes(m.get("saved_activation_bytes"))),
        ("saved activations, analytic", _fmt_bytes(m.get("saved_activation_bytes_analytic"))),
        ("  of a forward of B x T", _fmt_num(m.get("saved_activation_positions") or None, ",.0f")),
        ("KV cache / token, measured", _fmt_bytes(m.get("kv_cache_bytes_per_token"))),
        ("KV cache / token, analytic", _fmt_bytes(m.get("kv_cache_bytes_per_token_analytic"))),
    ]
    if "peak_device_bytes" in m:
        rows.append(("peak device memory", _fmt_bytes(m["peak_device_bytes"])))
    if r["maxvio"]:
        rows.append(("MaxVio (mean of layers, steps)", _fmt_num(r["maxvio_mean"], ".3f")))
        for layer, v in r["maxvio"].items():
            rows.append((f"  MaxVio {layer}", _fmt_num(v, ".3f")))
    for name in r.get("component_reports", []):
        for key, v in r[name].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append((f"{name}: {key}", _fmt_num(v, ".4g")))
            elif isinstance(v, str):
                rows.append((f"{name}: {key}", v))
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) and len(v) <= 16:
                rows.append((f"{name}: {key}", ", ".join(_fmt_num(x, ".3g") for x in v)))
            elif isinstance(v, dict) and 0 < len(v) <= 16 and all(isinstance(x, dict) for x in v.values()):
                for inner, leaves in v.items():  # e.g. fp8's by_layer: {layer: {output_rel_error: ...}}
                    numbers = {
                        k: x for k, x in leaves.items() if isinstance(x, (int, float)) and not isinstance(x, bool)
                    }
                    if numbers:
                        text = ", ".join(f"{k} {_fmt_num(x, '.3g')}" for k, x in numbers.items())
                        rows.append((f"{name}: {key} {inner}", text))
    return rows


def _print(reports: list[dict[str, Any]], payload: dict[str, Any], out_dir: Path) -> None:
    from rich.table import Table

    console = stdout_console()
    table = Table(title="dsk profile", show_lines=False)
    table.add_column("")
    for r in reports:
        table.add_column(r["label"], justify="right")
    per = [dict(_rows(r)) for r in reports]
    keys: list[str] = []
    for rows in per:
        keys += [k for k in rows if k not in keys]
    for key in keys:
        table.add_row(key, *[rows.get(key, "-") for rows in per])
    console.print(table)
    if len(reports) > 1:
        ratio = Table(title=f"ratios to {reports[0]['label']}")
        ratio.add_column("")
        for label in payload["ratios"]:
            ratio.add_column(label, justify="right")
        names = list(next(iter(payload["ratios"].values())))
        for name in names:
            ratio.add_row(name, *[_fmt_num(v.get(name), ".3f") + "x" for v in payload["ratios"].values()])
        console.print(ratio)
    for key, path in payload["files"].items():
        console.print(f"[dim]{key}: {path}[/]")
