"""Data-parallel scaling on this machine: 2 processes x 1 thread (``replicate``) against 1 process x 2 threads.

Rows (``python -m bench parallel``):
* ``data_parallel``: training tokens/s of the ``recipes/quickstart.toml`` model (seq 40, a global batch of 64 rows
  per optimizer step, float32, CPU) through the ``pretrain`` trainer's own step. ``dsk`` = 2 gloo ranks with
  ``[parallel.data] type = "replicate"`` (full mode also ``zero1`` and ``fsdp``), 1 thread each, 32 rows per rank
  (each rank reads the global batch and keeps its half); ``peer`` = one process with 2 intra-op threads on the
  whole batch of 64 rows. Both read the same batches. The two sides take turns round by round (the ranks wait
  on a queue while the single process runs, so neither shares the cores with the other); ``dsk`` and ``peer`` are
  medians over the rounds and ``ratio = peer step time / dsk step time``, the median of the per-round ratios, so
  load from other processes hits both sides alike. ``ratio > 1``: the two processes train faster than the two
  threads.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.lm_run import lm_run

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, SEQ, WORLD = 64, 40, 2


def _quickstart_run(tmp: Path, kind: str | None) -> Any:
    """A set-up ``pretrain`` run (``dsk_trainers.lm._Run``) of the quickstart recipe: the global batch of 64 rows
    over ``WORLD`` ranks of data-parallel strategy ``kind``, or in one process (None)."""
    per_rank = GLOBAL_BATCH // WORLD if kind is not None else GLOBAL_BATCH
    sets = [f"trainer.batch_size={per_rank}", f"trainer.seq_len={SEQ}", 'trainer.device="cpu"']
    if kind is not None:
        sets.append(f'parallel.data.type="{kind}"')
    run = lm_run("quickstart.toml", tmp, [("set", x) for x in sets])
    return run


def _timed_steps(run: Any, n: int) -> tuple[float, int]:
    """Wall time of ``n`` optimizer steps and the tokens they trained on (all ranks')."""
    t0 = time.perf_counter()
    tokens = sum(int(run.train_step()["tokens"]) for _ in range(n))
    return time.perf_counter() - t0, tokens


def _rank(rank: int, port: int, kinds: list[str], commands: Any, results: Any) -> None:
    """One rank: build a run per strategy, then time the steps each ``(kind, n)`` command asks for, until None."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {kind: _quickstart_run(Path(tmp) / kind, kind) for kind in kinds}
            results.put((rank, "ready", 0.0, 0))
            while (command := commands[rank].get()) is not None:
                kind, n = command
                seconds, tokens = _timed_steps(runs[kind], n)
                results.put((rank, "done", seconds, tokens))
            for run in runs.values():
                run.built.parallel.teardown()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the bench
        results.put((rank, f"failed: {exc!r}", 0.0, 0))
    finally:
        dist.destroy_process_group()


def _collect(results: Any, what: str) -> tuple[float, int]:
    """Both ranks' answers: the slowest rank's time (a collective step waits for it) and the tokens."""
    seconds, tokens = 0.0, 0
    for _ in range(WORLD):
        rank, status, s, n = results.get(timeout=600)
        if status != what:
            raise RuntimeError(f"rank {rank}: {status}")
        seconds, tokens = max(seconds, s), n
    return seconds, tokens


def run(quick: bool = False, kinds: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of ``python -m bench parallel`` (see the module docstring); quick: replicate only, fewer rounds."""
    import socket

    import torch.multiprocessing as mp

    kinds = kinds or (["replicate"] if quick else ["replicate", "zero1", "fsdp"])
    warmup, rounds, per_round = (2, 3, 2) if quick else (3, 7, 3)
    ctx = mp.get_context("spawn")
    commands = [ctx.Queue() for _ in range(WORLD)]
    results = ctx.Queue()
    with socket.socket() as sock:  # a port free on localhost for the ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, port, kinds, commands, results), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    threads = torch.get_num_threads()
    dsk_t: dict[str, list[float]] = {k: [] for k in kinds}
    ratios: dict[str, list[float]] = {k: [] for k in kinds}
    peer_t: list[float] = []
    tokens = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            torch.set_num_threads(WORLD)
            single = _quickstart_run(Path(tmp), None)
            _collect(results, "ready")
            for i in range(rounds + 1):  # round 0 is the warm-up
                n = warmup if i == 0 else per_round
                seconds = {}
                for kind in kinds:
                    for q in commands:
                        q.put((kind, n))
                    seconds[kind], tokens[kind] = _collect(results, "done")
                peer_seconds, tokens[None] = _timed_steps(single, n)
                if i > 0:
                    peer_t.append(peer_seconds / n)
                    for kind in kinds:
                        dsk_t[kind].append(seconds[kind] / n)
                        ratios[kind].append(peer_seconds / seconds[kind])
    finally:
        torch.set_num_threads(threads)
        for q in commands:
            q.put(None)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    tokens_per_step = tokens[None] / per_round
    load = os.getloadavg()[0]
    return [
        {
            "bench": "data_parallel",
            "case": f"quickstart model B{GLOBAL_BATCH}x{SEQ} fp32 AdamW: {WORLD} procs x 1 thread ({kind}, "
            f"B{GLOBAL_BATCH // WORLD} each) vs 1 proc x {WORLD} threads",
            "dsk": tokens_per_step / statistics.median(dsk_t[kind]),
            "peer": tokens_per_step / statistics.median(peer_t),
            "ratio": statistics.median(ratios[kind]),
            "target": "ratio >= 1 (2 ranks at least as fast as 2 threads)",
            "unit": "tokens/s",
            "same_tokens": tokens[kind] == tokens[None],
            "load_avg_1min": load,  # other processes' load: a 2-thread process suffers most from it
        }
        for kind in kinds
    ]


if __name__ == "__main__":
    for row in run(quick=False):
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
