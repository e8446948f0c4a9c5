"""Router ablation: train ``recipes/ablations/router-*.toml`` (same model and data, three routers) and print a table
of router, final loss and final MaxVio.

    python -m bench.ablation                  # full length (the recipes' steps), runs/ablations/<router>/
    python -m bench.ablation --steps 150      # shorter runs
    python -m bench.ablation --seeds 0 1 2    # each router with three seeds (dsk.seed = data.seed), plus means
    python -m bench.ablation --json out.json  # also write the rows

"Final" numbers are means over the last 10% of the optimizer steps (single steps are noisy): ``final_loss`` is the
total training loss (LM + MTP + auxiliary), ``lm_loss`` the next-token part alone (the fair comparison, since
aux_loss adds its balance term to the total), ``maxvio`` the batch MaxVio ``max_i load_i / mean load - 1`` averaged
over the MoE layers (DeepSeek-V3 §4.5.2). Target: noaux_tc MaxVio at most 1/4 of aux_loss's, with an LM loss no worse.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("router-greedy", "router-aux-loss", "router-noaux-tc")


class _Quiet:
    """A console that prints nothing (the ablation shows one table at the end)."""

    is_terminal = False

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def train_recipe(recipe: Path, run_dir: Path, sets: list[str]) -> dict[str, Any]:
    """Train one recipe in-process (fresh run directory) and return its stage summary."""
    from dsk.plugins import make_plugin_manager
    from dsk.recipe import load_recipe, validate_recipe
    from dsk.registry import build_registry
    from dsk.train.progress import Reporter
    from dsk.train.runner import run_recipe

    pm = make_plugin_manager()
    registry = build_registry(pm)
    loaded = load_recipe(str(recipe), overrides=[("set", s) for s in sets])
    validated = validate_recipe(loaded, registry, pm, require=("model", "trainer"), check=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = run_recipe(
        validated,
        registry=registry,
        pm=pm,
        run_dir=run_dir,
        recipe_path=str(recipe),
        reporter=Reporter(_Quiet(), False),
    )
    return summary["stages"][0]


def run_ablation(
    steps: int | None = None, out_dir: Path | None = None, seed: int | None = None
) -> list[dict[str, Any]]:
    """Train the three router recipes; one result dict per router (``seed`` sets both dsk.seed and data.seed)."""
    sets = [] if steps is None else [f"trainer.steps={steps}", f"optimizer.warmup_steps={max(1, steps // 20)}"]
    if seed is not None:
        sets += [f"dsk.seed={seed}", f"data.seed={seed}"]
    base = out_dir or Path(tempfile.mkdtemp(prefix="dsk-ablation-"))
    results = []
    for name in RECIPES:
        started = time.perf_counter()
        run_dir = base / (name if seed is None else f"{name}-seed{seed}")
        stage = train_recipe(ROOT / "recipes" / "ablations" / f"{name}.toml", run_dir, sets)
        results.append(
            {
                "router": name.removeprefix("router-").replace("-", "_"),
                "seed": seed,
                "steps": stage["steps"],
                "final_loss": stage["final_loss"],
                "lm_loss": stage["final_lm_loss"],
                "maxvio": stage["moe/maxvio"],
                "accuracy": stage.get("eval/accuracy"),
                "seconds": time.perf_counter() - started,
                "run_dir": str(run_dir),
            }
        )
    return results


def mean_over_seeds(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per router: the mean of each number over the seeds that were run."""
    out = []
    for router in dict.fromkeys(r["router"] for r in results):
        rows = [r for r in results if r["router"] == router]
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("final_loss", "lm_loss", "maxvio", "seconds")}
        accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        mean["accuracy"] = sum(accs) / len(accs) if accs else None
        out.append({"router": router, "seed": "mean", "steps": rows[0]["steps"], **mean})
    return out


def rows_for_bench(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``bench`` rows: per router its final MaxVio and LM loss; ratio rows compare noaux_tc with aux_loss."""
    by = {r["router"]: r for r in results}
    steps = results[0]["steps"]
    rows = []
    for r in results:
        rows.append(
            {"bench": "train", "case": f"ablation {r['router']} final MaxVio ({steps} steps)", "dsk": r["maxvio"],
             "peer": None, "ratio": None, "target": "", "unit": "MaxVio"}
        )  # fmt: skip
        rows.append(
            {"bench": "train", "case": f"ablation {r['router']} final LM loss ({steps} steps)", "dsk": r["lm_loss"],
             "peer": None, "ratio": None, "target": "", "unit": "nats/token"}
        )  # fmt: skip
    if "noaux_tc" in by and "aux_loss" in by:
        ours, peer = by["noaux_tc"], by["aux_loss"]
        rows.append(
            {"bench": "train", "case": "ablation MaxVio noaux_tc vs aux_loss", "dsk": ours["maxvio"],
             "peer": peer["maxvio"], "ratio": peer["maxvio"] / ours["maxvio"] if ours["maxvio"] else None,
             "target": ">= 4 (noaux_tc MaxVio <= 1/4 of aux_loss's)", "unit": "MaxVio"}
        )  # fmt: skip
        rows.append(
            {"bench": "train", "case": "ablation LM loss noaux_tc vs aux_loss", "dsk": ours["lm_loss"],
             "peer": peer["lm_loss"], "ratio": peer["lm_loss"] / ours["lm_loss"],
             "target": ">= 1 (loss no worse)", "unit": "nats/token"}
        )  # fmt: skip
    return rows


def print_table(results: list[dict[str, Any]]) -> None:
    """The ablation table on stdout (with per-router means when several seeds were run)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"router ablation ({results[0]['steps']} steps each; means over the last 10% of steps)")
    for col in ("router", "seed", "final loss", "LM loss", "final MaxVio", "accuracy", "time"):
        table.add_column(col, justify="left" if col == "router" else "right")
    several = len({r["seed"] for r in results}) > 1
    for r in results + (mean_over_seeds(results) if several else []):
        acc = r["accuracy"]
        table.add_row(
            r["router"], "-" if r["seed"] is None else str(r["seed"]), f"{r['final_loss']:.4f}",
            f"{r['lm_loss']:.4f}", f"{r['maxvio']:.3f}", "-" if acc is None else f"{100 * acc:.1f}%",
            f"{r['seconds']:.0f}s",
        )  # fmt: skip
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override trainer.steps of the three recipes")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (dsk.seed and data.seed) to run")
    parser.add_argument("--out", type=Path, default=Path("runs") / "ablations", help="where the runs go")
    parser.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results = []
    for seed in args.seeds or [None]:
        results += run_ablation(args.steps, args.out, seed)
    print_table(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
