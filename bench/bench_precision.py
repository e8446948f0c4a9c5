"""FP8 against BF16 training on recipes/fp8.toml, and what BF16 and torch.compile cost on this CPU.

``.venv/bin/python -m bench.bench_precision [--seeds 0,1,2] [--steps N] [--timing-steps N] [--out FILE]``

Every run is ``dsk train recipes/fp8.toml`` in its own process (``--set`` overrides only), read back from its
``metrics.jsonl``. The runs of one comparison differ only in the setting compared; the data stream is the same
(the task's own ``data.seed``), and a "seed" is ``dsk.seed``, the model's initial weights.

Rows:

* final loss: the mean training loss (``loss`` = LM + MTP + balance, and ``lm_loss``) of the last 10% of steps, per
  run; FP8 (blockwise, the recipe) and FP8 tensorwise against BF16 (``--set features.fp8.enabled=false``) as the
  relative difference ``(fp8 - bf16) / bf16`` for the recipe's seed and the mean over the seeds; the target is
  |difference| <= 0.25% (DeepSeek-V3 §3.3.2). BF16's own seed-to-seed spread ``(max - min) / mean`` over the
  seeds says how small a difference the comparison can resolve; it must itself be below 0.25%.
* step time: median seconds per optimizer step after ``WARMUP`` steps: BF16 against FP32 (both without FP8,
  recompute and EMA, so the GEMM dtype is the only difference) and ``[features.compile]`` against eager (FP32,
  same runs; compile's warm-up steps are left out of the median and reported apart).

The loss floor of the task (its entropy, from ``dsk_tasks.markov``) is printed with the losses: how close the
runs got to the best possible loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RECIPE = "recipes/fp8.toml"
WARMUP = 3  # steps left out of the step-time medians (first-step allocations; compile warm-up is reported apart)
TARGET = 0.25  # percent
OFF = ("features.fp8.enabled=false",)
PLAIN = ("features.fp8.enabled=false", "features.recompute.enabled=false", "features.ema.enabled=false")


def train(run_dir: Path, sets: tuple[str, ...], steps: int, seed: int) -> list[dict]:
    """One ``dsk train`` of the recipe with ``sets``; its training rows."""
    args = [str(Path(sys.executable).with_name("dsk")), "train", RECIPE, "--run-dir", str(run_dir)]
    for s in (*sets, f"trainer.steps={steps}", f"dsk.seed={seed}", "checkpoint.every=0"):
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"]


def final(rows: list[dict], key: str = "loss") -> float:
    """The mean of ``key`` over the last 10% of the steps (at least one)."""
    tail = rows[-max(1, len(rows) // 10) :]
    return statistics.fmean(r[key] for r in tail)


def step_time(rows: list[dict], skip: int = WARMUP) -> float:
    """Median seconds per step after ``skip`` steps."""
    return statistics.median(r["step_s"] for r in rows[skip:])


def rel(a: float, b: float) -> float:
    """``(a - b) / b`` in percent."""
    return 100.0 * (a - b) / b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="dsk.seed values (the first is the recipe's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's)")
    parser.add_argument("--timing-steps", type=int, default=30, help="steps of the step-time runs")
    parser.add_argument("--skip-timing", action="store_true", help="only the loss comparison")
    parser.add_argument("--skip-tensorwise", action="store_true", help="no tensorwise FP8 run")
    parser.add_argument("--jobs", type=int, default=1, help="loss runs side by side (timing runs are always alone)")
    parser.add_argument("--compile-bf16", action="store_true", help="also time compile under bf16 (slow warm-up)")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]

    import tomllib
    from dsk_tasks.config import MarkovConfig
    from dsk_tasks.markov import MarkovTask

    recipe = tomllib.loads(Path(RECIPE).read_text())
    steps = args.steps or recipe["trainer"]["steps"]
    data = {k: v for k, v in recipe["data"].items() if k != "type"}
    task = MarkovTask(MarkovConfig(**data))
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"bench_precision: {RECIPE}, {steps} steps per run, seeds {seeds}, torch threads = trainer.cpu_threads")
    say(
        f"task markov: entropy rate {task.entropy_rate:.4f} nats/symbol, LM loss floor {task.loss_floor:.4f} "
        f"nats/target (order {task.config.order}, {task.config.vocab} symbols, length {task.config.length})"
    )
    started = time.perf_counter()
    results: dict[str, dict[int, list[dict]]] = {"bf16": {}, "fp8": {}, "fp8_tensorwise": {}}
    variants = {"bf16": OFF, "fp8": (), "fp8_tensorwise": ("features.fp8.scaling=tensorwise",)}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        jobs = [
            (name, seed, sets)
            for seed in seeds
            for name, sets in variants.items()
            if not (name == "fp8_tensorwise" and (args.skip_tensorwise or seed != seeds[0]))  # the recipe's seed
        ]

        def one(job: tuple[str, int, tuple[str, ...]]) -> None:
            name, seed, sets = job
            t0 = time.perf_counter()
            rows = train(Path(tmp) / f"{name}-{seed}", sets, steps, seed)
            results[name][seed] = rows
            say(
                f"  run {name:<15} seed {seed}: loss {final(rows):.5f}  lm_loss {final(rows, 'lm_loss'):.5f}  "
                f"({time.perf_counter() - t0:.0f} s)"
            )

        # the loss runs are independent processes (their losses do not depend on timing): --jobs runs them side by side
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(one, jobs))
        say()
        say("final training loss (mean of the last 10% of steps), relative difference against BF16:")
        say(f"  {'':<22}{'loss':>10}{'lm_loss':>10}   (target: |diff| <= {TARGET}%)")
        first = seeds[0]
        for name in ("fp8", "fp8_tensorwise"):
            if first not in results[name]:
                continue
            for key_label, pick in (
                (f"seed {first}", [first]),
                (f"mean of {len(seeds)} seeds", [s for s in seeds if s in results[name]]),
            ):
                if len(pick) < len(seeds) and key_label.startswith("mean"):
                    continue
                d = [
                    rel(
                        statistics.fmean(final(results[name][s], k) for s in pick),
                        statistics.fmean(final(results["bf16"][s], k) for s in pick),
                    )
                    for k in ("loss", "lm_loss")
                ]
                say(f"  {name + ', ' + key_label:<22}{d[0]:>+9.3f}%{d[1]:>+9.3f}%")
        if len(seeds) > 1:
            for k in ("loss", "lm_loss"):
                values = [final(results["bf16"][s], k) for s in seeds]
                spread = 100.0 * (max(values) - min(values)) / statistics.fmean(values)
                say(f"  BF16 seed-to-seed spread ({k}, (max - min) / mean over {len(seeds)} seeds): {spread:.3f}%")
        lm = statistics.fmean(final(results["bf16"][s], "lm_loss") for s in seeds)
        say(f"  BF16 lm_loss {lm:.4f} is {rel(lm, task.loss_floor):+.2f}% above the task's floor {task.loss_floor:.4f}")

        if not args.skip_timing:
            n = args.timing_steps
            say()
            say(f"step time (median s/step after {WARMUP} steps, {n} steps, no fp8 / recompute / ema):")
            fp32 = train(Path(tmp) / "fp32", (*PLAIN, "features.bf16.enabled=false"), n, first)
            bf16 = train(Path(tmp) / "bf16-time", PLAIN, n, first)
            t32, t16 = step_time(fp32), step_time(bf16)
            say(f"  fp32 eager      {t32:.4f} s")
            say(f"  bf16 eager      {t16:.4f} s   bf16/fp32 = {t16 / t32:.2f}")
            for label, sets, eager in (
                ("fp32", (*PLAIN, "features.bf16.enabled=false"), fp32),
                *([("bf16", PLAIN, bf16)] if args.compile_bf16 else []),
            ):
                try:
                    comp = train(Path(tmp) / f"compile-{label}", (*sets, "features.compile.enabled=true"), n, first)
                except RuntimeError as exc:  # report a composition torch refuses, keep the other figures
                    say(f"  {label} compiled   failed: {str(exc).strip().splitlines()[-1][:300]}")
                    continue
                tc, warm = step_time(comp, 10), sum(r["step_s"] for r in comp[:10])
                ratio = tc / step_time(eager)
                say(f"  {label} compiled   {tc:.4f} s   compile/eager = {ratio:.2f}   (first 10 steps: {warm:.0f} s)")
                d = rel(final(comp, "loss"), final(eager, "loss"))
                say(f"  {label} compiled vs eager final loss ({n} steps): {d:+.4f}%")
    say(f"total {time.perf_counter() - started:.0f} s")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
