"""Optimizer memory: state bytes of AdamW vs adamw_bf16, their step times, the EMA update and the offload wrapper.

    .venv/bin/python -m bench.bench_optim_memory            # the table (under a minute)
    .venv/bin/python -m bench.bench_optim_memory --quick    # fewer timed steps

Two parameter sets, float32 on this CPU, one torch thread (the quickstart recipe's ``cpu_threads``):

* ``quickstart``: the parameters of ``recipes/quickstart.toml``'s model (MLA + MoE + MTP), with the gradients of
  one real training step of the ``pretrain`` trainer;
* ``8M``: eight 1024 x 1024 matrices with random gradients (large tensors, where per-tensor overheads vanish).

For each set, in one process and interleaved step by step (median of the timed steps):

* optimizer-state bytes: every tensor of ``optimizer.state`` after a step (moments and step counters), for torch's
  AdamW (``[optimizer] type = "adamw"``, FP32 moments) and ``adamw_bf16``; ratio = AdamW / adamw_bf16 (2 means
  half the bytes). The moments alone are exactly half (tests/unit/plugins/dsk_memory).
* optimizer step time: ``adamw`` with torch's fused kernel (what ``implementation = "auto"`` picks here) and with
  foreach, against ``adamw_bf16`` (foreach ops with upcasts); ratio = peer / dsk (below 1: adamw_bf16 is slower).
* EMA update time: ``[features.ema]``'s ``after_step`` (one foreach lerp into CPU FP32 copies), against the fused
  AdamW step it follows (ratio = AdamW step / EMA update).
* training loss: the quickstart recipe trained ``--train-steps`` steps (200) with ``adamw`` (fused), ``adamw_bf16``
  and, as the noise floor, ``adamw`` with the foreach kernel (the same FP32 arithmetic, rounded differently): the
  mean loss of the last 10 % of steps; ratio = adamw fused / the other. The quickstart's loss falls in sharp phase
  transitions, so runs that differ only in rounding already end apart (issue 10 measured 0.7 % after 300 steps);
  the BF16-moment difference means something only next to that spread.
* offload step time: ``[features.offload]`` around fused AdamW (gradient copy in, step on the masters, weights
  copy out), against fused AdamW alone. On a CPU the two copies are pure overhead; the point of offload is the
  training device's memory, which this bench does not measure.

Not measured here: training-device (GPU) memory and the host <-> device copy overlap of ema / offload; this machine
has no GPU (docs/memory.md says so).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.lm_run import lm_run

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_run(tmp: Path, overrides: list[str] = ()) -> Any:
    """A set-up ``pretrain`` run of the quickstart recipe (with ``--set`` overrides) writing into ``tmp``."""
    run = lm_run("quickstart.toml", tmp, [("set", o) for o in overrides])
    torch.set_num_threads(run.cfg.cpu_threads or 1)
    return run


def _quickstart_model(tmp: Path) -> nn.Module:
    """The quickstart model with the gradients of one real training step in ``.grad``."""
    from dsk.api.runtime import training_loss

    run = _quickstart_run(tmp)
    batch = next(run.batches)
    training_loss(run.model, batch["input_ids"], batch["labels"], side=run.built.side).loss.backward()
    return run.built.base_model


class _Matrices(nn.Module):
    def __init__(self, n: int = 8, rows: int = 1024, cols: int = 1024):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.ParameterList([nn.Parameter(torch.randn(rows, cols) * 0.02) for _ in range(n)])
        for p in self.w:
            p.grad = torch.randn_like(p) * 1e-3


def _state_bytes(opt: torch.optim.Optimizer, keys: tuple[str, ...] | None = None) -> int:
    total = 0
    for state in opt.inner.state.values() if hasattr(opt, "inner") else opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and (keys is None or key in keys):
                total += value.numel() * value.element_size()
    return total


def measure(model: nn.Module, steps: int, warmup: int = 3) -> dict[str, Any]:
    """Step times (median seconds) and state bytes of the optimizers and the EMA on ``model``'s parameters."""
    from dsk_memory.adamw_bf16 import build_adamw_bf16
    from dsk_memory.config import AdamWBF16Config, EMAConfig
    from dsk_memory.ema import EMA
    from dsk_memory.offload import CPUOffloadOptimizer
    from dsk_optim.adamw import build_adamw
    from dsk_optim.config import AdamWConfig

    fused = build_adamw(AdamWConfig(implementation="fused"), model)
    foreach = build_adamw(AdamWConfig(implementation="foreach"), model)
    bf16 = build_adamw_bf16(AdamWBF16Config(), model)
    offload = CPUOffloadOptimizer(build_adamw(AdamWConfig(implementation="fused"), model))
    ema = EMA(EMAConfig(decay=0.999))
    ema.after_weights(model, None)
    # every optimizer steps the same parameters with the same gradients: the values drift, the work does not
    timed: dict[str, Callable[[], Any]] = {
        "adamw_fused": fused.step,
        "adamw_foreach": foreach.step,
        "adamw_bf16": bf16.step,
        "offload_fused": offload.step,
        "ema": lambda: ema.after_step(None, 1),
    }
    times: dict[str, list[float]] = {k: [] for k in timed}
    with torch.no_grad():
        for i in range(warmup + steps):
            for name, fn in timed.items():
                t = time.perf_counter()
                fn()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t)
    moments = ("exp_avg", "exp_avg_sq")
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": {k: statistics.median(v) for k, v in times.items()},
        "state_bytes": {"adamw": _state_bytes(fused), "adamw_bf16": _state_bytes(bf16)},
        "moment_bytes": {"adamw": _state_bytes(fused, moments), "adamw_bf16": _state_bytes(bf16, moments)},
    }


def train_losses(steps: int) -> dict[str, float]:
    """Mean training loss of the last 10 % of ``steps`` quickstart steps with adamw (fused), adamw (foreach: the
    same FP32 arithmetic rounded differently, the noise floor) and adamw_bf16 (same seed, data and schedule; the
    runs are interleaved step by step)."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        kinds = {
            "adamw": ['optimizer.type="adamw"', 'optimizer.implementation="fused"'],
            "adamw_foreach": ['optimizer.type="adamw"', 'optimizer.implementation="foreach"'],
            "adamw_bf16": ['optimizer.type="adamw_bf16"'],
        }
        for kind, sets in kinds.items():
            (Path(tmp) / kind).mkdir()
            runs[kind] = _quickstart_run(Path(tmp) / kind, [*sets, f"trainer.steps={steps}"])
        losses: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(steps):
            for kind, run in runs.items():
                losses[kind].append(run.train_step()["loss"])
    tail = max(1, steps // 10)
    return {k: sum(v[-tail:]) / tail for k, v in losses.items()}


def rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The bench rows of each parameter set."""
    out = []
    for case, r in results.items():
        if case == "train":
            continue
        label = f"{case} ({r['params'] / 1e6:.2f}M params, fp32, CPU)"
        s, b = r["step_s"], r["state_bytes"]
        out += [
            {"bench": "optim_memory", "case": f"optimizer-state bytes, adamw_bf16 vs adamw, {label}",
             "dsk": b["adamw_bf16"], "peer": b["adamw"], "ratio": b["adamw"] / b["adamw_bf16"],
             "target": ">= 2 on the moments (halved)", "unit": "bytes"},
            {"bench": "optim_memory", "case": f"optimizer step, adamw_bf16 vs adamw fused, {label}",
             "dsk": s["adamw_bf16"], "peer": s["adamw_fused"], "ratio": s["adamw_fused"] / s["adamw_bf16"],
             "target": None, "unit": "s"},
            {"bench": "optim_memory", "case": f"optimizer step, adamw_bf16 vs adamw foreach, {label}",
             "dsk": s["adamw_bf16"], "peer": s["adamw_foreach"], "ratio": s["adamw_foreach"] / s["adamw_bf16"],
             "target": None, "unit": "s"},
            {"bench": "optim_memory", "case": f"EMA update vs the adamw fused step, {label}",
             "dsk": s["ema"], "peer": s["adamw_fused"], "ratio": s["adamw_fused"] / s["ema"],
             "target": None, "unit": "s"},
            {"bench": "optim_memory", "case": f"offload + adamw fused vs adamw fused (CPU copies only), {label}",
             "dsk": s["offload_fused"], "peer": s["adamw_fused"], "ratio": s["adamw_fused"] / s["offload_fused"],
             "target": None, "unit": "s"},
        ]  # fmt: skip
    if "train" in results:
        t = results["train"]
        out.append(
            {"bench": "optim_memory",
             "case": f"final training loss (mean of the last 10% of {t['steps']} quickstart steps), adamw_bf16 vs adamw",
             "dsk": t["adamw_bf16"], "peer": t["adamw"], "ratio": t["adamw"] / t["adamw_bf16"],
             "target": "about the FP32 rounding spread (next row)", "unit": "nats"}
        )  # fmt: skip
        out.append(
            {"bench": "optim_memory",
             "case": "final training loss, adamw foreach vs adamw fused (FP32 both: rounding-only spread)",
             "dsk": t["adamw_foreach"], "peer": t["adamw"], "ratio": t["adamw"] / t["adamw_foreach"],
             "target": None, "unit": "nats"}
        )  # fmt: skip
    return out


def measure_all(steps: int, train_steps: int) -> dict[str, dict[str, Any]]:
    """Both parameter sets (see the module docstring), and the training-loss comparison."""
    with tempfile.TemporaryDirectory() as tmp:
        quickstart = measure(_quickstart_model(Path(tmp)), steps)
    out = {"quickstart": quickstart, "8M": measure(_Matrices(), max(3, steps // 2))}
    if train_steps:
        out["train"] = {"steps": train_steps, **train_losses(train_steps)}
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows of ``python -m bench optim_memory``."""
    return rows(measure_all(steps=10 if quick else 50, train_steps=30 if quick else 200))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_optim_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 timed steps instead of 50, 30 training steps")
    parser.add_argument("--train-steps", type=int, default=None, help="quickstart training steps (0: skip; 200)")
    args = parser.parse_args(argv)
    train_steps = args.train_steps if args.train_steps is not None else (30 if args.quick else 200)
    results = measure_all(steps=10 if args.quick else 50, train_steps=train_steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; GPU memory: not measured (no GPU)")
    print(f"{'set':<11} {'params':>7} {'state MiB adamw':>16} {'adamw_bf16':>11} {'ratio':>6} {'moments ratio':>14}")
    for case, r in results.items():
        if case == "train":
            continue
        b, m = r["state_bytes"], r["moment_bytes"]
        print(
            f"{case:<11} {r['params'] / 1e6:>6.2f}M {b['adamw'] / 2**20:>16.3f} {b['adamw_bf16'] / 2**20:>11.3f} "
            f"{b['adamw'] / b['adamw_bf16']:>6.3f} {m['adamw'] / m['adamw_bf16']:>14.3f}"
        )
    print(f"\n{'set':<11} " + " ".join(f"{k + ' ms':>17}" for k in results["quickstart"]["step_s"]))
    for case, r in results.items():
        if case == "train":
            continue
        print(f"{case:<11} " + " ".join(f"{v * 1e3:>17.3f}" for v in r["step_s"].values()))
    print()
    for row in rows(results):
        print(f"{row['case']}: dsk {row['dsk']:.6g}, peer {row['peer']:.6g}, ratio {row['ratio']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
