"""Activation recomputation: saved-activation bytes and training step time of none / selective / full.

    .venv/bin/python -m bench.bench_memory            # the table (about a minute)
    .venv/bin/python -m bench.bench_memory --quick    # fewer timed steps
    .venv/bin/python -m bench.bench_memory --variant gather   # also time a policy experiment
    .venv/bin/python -m bench.bench_memory --profile selective   # where one step's CPU time goes

The model and the batches are ``recipes/quickstart.toml``'s (its ``[model]``, batch 64 x 40 of 2-digit addition,
float32, CPU, the recipe's one thread), built three times by the ``pretrain`` trainer with the same seed:
``[features.recompute]`` off, ``mode = "selective"`` (method ``regions``, and ``sac``), ``mode = "full"``. The runs
compute the same losses
bit for bit (tests/unit/plugins/dsk_recompute), so they train the same trajectory and their steps are comparable.

* saved bytes: :func:`dsk.profile.activations.saved_activation_bytes` around the training forward and loss
  (``dsk.api.runtime.training_loss``, MTP and balance loss included), after a warm-up step: the bytes of every
  storage the forward created that is still alive when it returns, less the loss and the parameters. It sees what
  autograd saves and what selective checkpointing caches, which saved-tensor hooks do not.
* step time: the trainer's whole optimizer step (forward, backward with the recomputation, clipping, AdamW, router
  bias update), the three runs interleaved step by step, median of the timed steps.

Rows: ``dsk`` = the mode, ``peer`` = no recomputation measured in the same run; ``ratio`` = peer / dsk for bytes
(higher = fewer bytes) and peer / dsk for time (below 1 = slower). Targets (issue 10): selective >= 30% fewer
saved bytes for <= 15% more step time; full >= 70% fewer saved bytes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
#: "selective" is the default method (by region, saved-tensor hooks); "selective-sac" torch's selective-checkpoint
#: contexts with dsk_recompute's policy (method = "sac")
MODES = ("none", "selective", "selective-sac", "full")


class _Quiet:
    is_terminal = False

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


#: policy experiments (``--variant``): selective mode that also saves these cheap ops outside the regions
VARIANTS: dict[str, tuple[str, ...]] = {
    "gather": ("index_select", "index_add", "cat"),
    "elementwise": ("index_select", "index_add", "cat", "add", "sigmoid", "clone"),
}


def _variant_policy(name: str):
    from dsk_recompute.recompute import RecomputePolicy

    return RecomputePolicy(also_saved=frozenset(getattr(torch.ops.aten, op) for op in VARIANTS[name]))


def _run(tmp: Path, mode: str, extra: list[tuple[str, str]]):
    """A set-up ``pretrain`` run of the quickstart recipe with ``[features.recompute] mode = mode`` (or none; a
    ``selective+VARIANT`` mode is selective with the policy experiment ``VARIANT``)."""
    from dsk_trainers.lm import _Run

    from dsk.plugins import make_plugin_manager
    from dsk.recipe import load_recipe, validate_recipe
    from dsk.registry import build_registry
    from dsk.train.context import RunContext
    from dsk.train.metrics import MetricsWriter
    from dsk.train.progress import Reporter

    pm = make_plugin_manager()
    registry = build_registry(pm)
    overrides = list(extra)
    base_mode, _, variant = mode.partition("+")
    if base_mode == "selective-sac":
        overrides += [("set", 'features.recompute.mode="selective"'), ("set", 'features.recompute.method="sac"')]
    elif base_mode != "none":
        overrides.append(("set", f'features.recompute.mode="{base_mode}"'))
    recipe = load_recipe(str(ROOT / "recipes" / "quickstart.toml"), overrides=overrides)
    sections = validate_recipe(recipe, registry, pm, check=True).resolved
    run_dir = tmp / mode
    run_dir.mkdir()
    ctx = RunContext(
        run_dir=run_dir, sections=sections, registry=registry, pm=pm,
        metrics=MetricsWriter(run_dir / "metrics.jsonl"), reporter=Reporter(_Quiet(), False),
        seed=sections["dsk"].seed,
    )  # fmt: skip
    run = _Run(sections["trainer"].build(), ctx)
    run.setup()
    if variant:
        from dsk_recompute.recompute import apply_recompute

        apply_recompute(run.model, "selective", policy=_variant_policy(variant), method="sac")
    torch.set_num_threads(sections["trainer"].config.cpu_threads or torch.get_num_threads())
    return run


def _saved_bytes(run: Any, batch: dict[str, torch.Tensor]) -> int:
    """Saved-activation bytes of one training forward of ``run``'s model on ``batch`` (then its backward)."""
    from dsk.api.runtime import training_loss
    from dsk.profile.activations import saved_activation_bytes

    model = run.model
    model.train()
    measured = saved_activation_bytes(
        lambda: training_loss(model, batch["input_ids"], batch["labels"], side=run.built.side).loss, model
    )
    measured.output.backward()
    run.optimizer.zero_grad(set_to_none=True)
    for side in run.built.side.stat_tensors():  # this forward's expert loads are not a step's
        side.zero_()
    return measured.bytes


def measure(
    steps: int = 12, warmup: int = 2, extra: list[tuple[str, str]] | None = None, variants: tuple[str, ...] = ()
) -> dict[str, dict]:
    """{mode: {"bytes", "step_s", "losses"}} for none / selective / full (see the module docstring)."""
    modes = MODES + tuple(f"selective+{v}" for v in variants)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {mode: _run(Path(tmp), mode, extra or []) for mode in modes}
        first = runs["none"]
        batches = [next(first.batches) for _ in range(steps + warmup + 1)]
        for run in runs.values():
            run.batches = iter(copy.copy(batches[1:]))
        out: dict[str, dict] = {mode: {"losses": [], "times": []} for mode in modes}
        for i in range(steps + warmup):
            for mode, run in runs.items():
                if i == warmup:  # warmed up (RoPE tables, kernels, allocator): the bytes of a forward
                    out[mode]["bytes"] = _saved_bytes(run, batches[0])
                t = time.perf_counter()
                row = run.train_step()
                elapsed = time.perf_counter() - t
                out[mode]["losses"].append(row["loss"])
                if i >= warmup:
                    out[mode]["times"].append(elapsed)
        for mode in modes:
            out[mode]["step_s"] = statistics.median(out[mode].pop("times"))
    return out


def op_overhead(reps: int = 200) -> dict[str, float]:
    """Seconds per call of the MLA attention kernel's forward called directly and through its dispatcher op
    (``torch.ops.dsk_mla.attention_forward``, what the autograd node now calls), at the quickstart's shape."""
    from dsk_mla import kernels

    ext = kernels.EXTENSION.load()
    if ext is None:
        return {}
    g = torch.Generator().manual_seed(0)
    B, T, H, dn, dr, dv = 64, 40, 4, 16, 8, 16
    args = [torch.randn(*shape, generator=g) for shape in ((B, T, H, dn), (B, T, H, dr), (B, T, H, dn), (B, T, dr))]
    args += [torch.randn(B, T, H, dv, generator=g), 0.2]
    calls = {"direct": ext.mla_attention_forward, "op": torch.ops.dsk_mla.attention_forward}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn(*args)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def profile_step(mode: str, extra: list[tuple[str, str]] | None = None, top: int = 12) -> str:
    """``torch.profiler``'s table (self CPU time) of one forward + backward of the quickstart model in ``mode``."""
    from torch.profiler import ProfilerActivity, profile

    from dsk.api.runtime import training_loss

    with tempfile.TemporaryDirectory() as tmp:
        run = _run(Path(tmp), mode, extra or [])
        batch = next(run.batches)
        model = run.model.train()
        for _ in range(2):  # warm-up
            training_loss(model, batch["input_ids"], batch["labels"]).loss.backward()
        # forward and backward under the profiler together: its record_function ops must be in both (docs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            training_loss(model, batch["input_ids"], batch["labels"]).loss.backward()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def rows(result: dict[str, dict]) -> list[dict[str, Any]]:
    """The bench rows: saved bytes and step time of each mode against no recomputation."""
    base = result["none"]
    out = []
    selective = (">= 1.43 (30% fewer)", ">= 0.87 (<= 15% slower)")
    targets = {"selective": selective, "selective-sac": selective, "full": (">= 3.33 (70% fewer)", None)}
    for mode in ("selective", "selective-sac", "full"):
        r = result[mode]
        out.append(
            {
                "bench": "memory",
                "case": f"saved-activation bytes, recompute {mode} vs none (quickstart model, B64x40 fp32)",
                "dsk": r["bytes"],
                "peer": base["bytes"],
                "ratio": base["bytes"] / r["bytes"],
                "target": targets[mode][0],
                "unit": "bytes",
            }
        )
        out.append(
            {
                "bench": "memory",
                "case": f"train step time, recompute {mode} vs none",
                "dsk": r["step_s"],
                "peer": base["step_s"],
                "ratio": base["step_s"] / r["step_s"],
                "target": targets[mode][1],
                "unit": "s",
            }
        )
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows of ``python -m bench memory``."""
    return rows(measure(steps=4 if quick else 12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 timed steps instead of 12")
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (every run)")
    parser.add_argument(
        "--variant", action="append", default=[], choices=sorted(VARIANTS), help="also time a policy experiment"
    )
    parser.add_argument("--profile", choices=MODES, help="only print torch.profiler's top ops of one step in MODE")
    args = parser.parse_args(argv)
    if args.profile:
        print(profile_step(args.profile, [("set", s) for s in args.set]))
        return 0
    steps = args.steps if args.steps is not None else (4 if args.quick else 12)
    result = measure(steps=steps, extra=[("set", s) for s in args.set], variants=tuple(args.variant))
    base = result["none"]
    same = all(r["losses"] == base["losses"] for r in result.values())
    print(f"{'mode':<22} {'saved MiB':>10} {'vs none':>8} {'fewer':>7} {'step ms':>8} {'vs none':>8}")
    for mode, r in result.items():
        print(
            f"{mode:<22} {r['bytes'] / 2**20:>10.2f} {r['bytes'] / base['bytes']:>8.3f} "
            f"{1 - r['bytes'] / base['bytes']:>7.1%} {r['step_s'] * 1e3:>8.1f} {r['step_s'] / base['step_s']:>8.3f}"
        )
    print(f"losses of the {len(base['losses'])} steps identical in every mode: {same}")
    ovh = op_overhead()
    if ovh:
        print(
            f"MLA attention kernel forward: direct {ovh['direct'] * 1e6:.1f} us, through the dispatcher op "
            f"{ovh['op'] * 1e6:.1f} us per call ({ovh['op'] / ovh['direct']:.3f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
