"""Run a function on N gloo ranks in fresh processes, for the multi-process tests.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes (spawned: no state inherited from pytest),
initialises the default gloo process group in each (rank, world size, a free local port), calls
``fn(rank, world_size, *args)`` there, and returns the ranks' return values in rank order. A rank that raises
fails the call with that rank's traceback. ``fn`` must be importable at module level (spawn pickles it by name)
and its return value picklable.

Every test that uses it belongs to the xdist group :data:`GROUP`, so two sets of ranks never share the 2 cores:
mark the module with ``pytestmark = pytest.mark.xdist_group(GROUP)``.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from typing import Any

#: the one xdist group of every multi-process test
GROUP = "multiprocess"


def free_port() -> int:
    """A TCP port free on localhost right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, world_size: int, port: int, fn: Any, args: tuple, queue: Any, threads: int, pg_timeout_s: float = 60.0
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
         "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )  # fmt: skip
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s))
        try:
            queue.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Any, world_size: int, *args: Any, timeout: float = 240.0, threads: int = 1, pg_timeout_s: float = 60.0
) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each run in its own gloo rank (see the module docstring);
    ``timeout``: seconds to wait for the ranks, ``pg_timeout_s``: the process group's collective timeout."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue, threads, pg_timeout_s), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            (results if ok else errors)[rank] = value
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        rank = min(errors)
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
