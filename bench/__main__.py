"""Run every benchmark module and print one table of dsk/peer ratios measured in this run.

    python -m bench                 # all benchmarks, full sizes
    python -m bench --quick         # small sizes (seconds)
    python -m bench moe mla         # only these modules (bench/bench_<name>.py)
    python -m bench --json out.json # also write the rows as JSON

Each module exposes ``run(quick: bool) -> list[dict]`` with rows
``{"bench", "case", "dsk", "peer", "ratio", "target", "unit"}``; ``ratio`` is how many times better dsk is
than the peer (for times: peer/dsk), so higher is better.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from pathlib import Path


def _modules() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_") :] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(_modules())})")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", dest="json_out", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    names = args.names or _modules()
    unknown = [n for n in names if n not in _modules()]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(_modules())}")

    import torch

    from dsk.train.process import tune_process

    # Both sides of every row run in this process: the training-process setup (glibc's mmap/trim thresholds
    # pinned) makes both run under the same allocator policy, whatever the other side freed (dsk.train.process).
    pinned = tune_process()["malloc_pinned"]
    threads = int(os.environ.get("DSK_BENCH_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    rows = []
    started = time.time()
    for name in names:
        module = importlib.import_module(f"bench.bench_{name}")
        t0 = time.time()
        try:
            got = module.run(quick=args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            got = [
                {
                    "bench": name,
                    "case": "ERROR",
                    "dsk": None,
                    "peer": None,
                    "ratio": None,
                    "target": f"{type(exc).__name__}: {exc}",
                    "unit": "",
                }
            ]
        print(f"[bench] {name}: {len(got)} rows in {time.time() - t0:.1f}s", file=sys.stderr)
        rows.extend(got)

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"dsk benchmarks ({'quick' if args.quick else 'full'}; torch {torch.__version__}, "
        f"{threads} threads, {platform.machine()}, malloc thresholds {'pinned' if pinned else 'default'})",
        header_style="bold",
    )
    for col in ("bench", "case", "dsk", "peer", "unit", "ratio", "target"):
        table.add_column(col, justify="right" if col in ("dsk", "peer", "ratio") else "left")
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in ("bench", "case", "dsk", "peer", "unit", "ratio", "target")))
    Console(width=200).print(table)
    print(f"total {time.time() - started:.0f}s", file=sys.stderr)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
