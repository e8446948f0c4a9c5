"""Many processes: the default process group of a run, the worker's tie to its launcher, and ``--nproc`` launch.

A run on N processes is N copies of the same ``dsk`` command, started by torch's own launcher
(``torch.distributed.run``: ``dsk train --nproc N`` calls it in-process, ``torchrun -m dsk train`` does the same
across nodes). Each copy finds its rank in the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
:func:`init_process_group` creates the default group once per process, gloo on CPU and NCCL on CUDA (each rank on
its local-rank device), with a timeout of :data:`DEFAULT_TIMEOUT_S` seconds instead of the 30 minutes of torch's
default, so that a rank stuck on a dead peer gives up within a stated bound (``DSK_DIST_TIMEOUT_S`` sets it).

torch's launcher starts its workers in new sessions (``start_new_session=True``): they would outlive a launcher
killed with SIGKILL. :func:`tie_to_launcher` makes the kernel kill a worker when its parent dies (Linux
``PR_SET_PDEATHSIG``) and, elsewhere, a watchdog thread exits it when the parent is gone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "LAUNCHER_PID_ENV",
    "TIMEOUT_ENV",
    "distributed_env",
    "init_process_group",
    "launch",
    "shutdown",
    "tie_to_launcher",
    "timeout_s",
]

#: seconds a collective waits for a peer before it fails (torch's default is 1800)
DEFAULT_TIMEOUT_S = 120.0
TIMEOUT_ENV = "DSK_DIST_TIMEOUT_S"
#: the pid of the ``dsk --nproc`` launcher, handed to its workers
LAUNCHER_PID_ENV = "DSK_LAUNCHER_PID"

_owns_group = False


def distributed_env() -> bool:
    """Whether this process was started by a launcher as one of several ranks (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def timeout_s() -> float:
    """The collective timeout: ``DSK_DIST_TIMEOUT_S`` or :data:`DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        return DEFAULT_TIMEOUT_S


def init_process_group() -> bool:
    """Create the default process group from the launcher's environment, once; True when this call created it.

    Nothing happens in one process, or when a group exists already (a test harness, an embedding program).
    """
    global _owns_group
    import torch
    import torch.distributed as dist

    if not distributed_env() or dist.is_initialized():
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
        backend = "nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    _owns_group = True
    return True


def shutdown() -> None:
    """Destroy the default process group if :func:`init_process_group` created it."""
    global _owns_group
    if not _owns_group:
        return
    import torch.distributed as dist

    _owns_group = False
    if dist.is_initialized():
        dist.destroy_process_group()


def _parent_watchdog(parent: int, period: float) -> None:
    while True:
        time.sleep(period)
        if os.getppid() != parent:
            os._exit(128 + signal.SIGKILL)


def tie_to_launcher() -> None:
    """Make this worker die with its launcher (see the module docstring). Safe to call more than once."""
    if not distributed_env() or getattr(tie_to_launcher, "_done", False):
        return
    tie_to_launcher._done = True  # type: ignore[attr-defined]
    expected = os.environ.get(LAUNCHER_PID_ENV)
    parent = int(expected) if expected else os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the launcher died before the tie was made
        os._exit(128 + signal.SIGKILL)
    threading.Thread(target=_parent_watchdog, args=(parent, 1.0), daemon=True, name="dsk-launcher-watch").start()


def launch(nproc: int, argv: list[str], *, console: Any = None) -> int:
    """Run ``python -m dsk <argv>`` on ``nproc`` local processes through torch's launcher; returns the exit code.

    Rank 0's output is the run's; a rank that fails is reported with its rank, exit code and error, every other
    rank is stopped by the launcher, and the code is 2 when every failed rank exited 2 (bad input), else 1.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default per worker; a recipe's cpu_threads wins
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"dsk-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        rdzv_configs={"rank": 0},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        elastic_launch(config, sys.executable)("-m", "dsk", *argv)
    except ChildFailedError as exc:
        return _report(exc, console)
    except SignalException as exc:  # SIGTERM/SIGINT to the launcher: it stopped the ranks, which saved first
        return 128 + int(exc.sigval)
    return 0


def _report(exc: Any, console: Any) -> int:
    """Print which rank failed first and how, and what became of the others; returns the launcher's exit code."""
    first_rank, first = exc.get_first_failure()
    failures = sorted(exc.failures.items())
    codes = [f.exitcode for _, f in failures]
    interrupted = {128 + signal.SIGINT, 128 + signal.SIGTERM}
    if all(c in interrupted for c in codes):  # Ctrl-C / SIGTERM: every rank saved and said so itself
        return codes[0]

    def how(failure: Any) -> str:
        if failure.exitcode < 0:
            return f"was killed by signal {-failure.exitcode} ({signal.Signals(-failure.exitcode).name})"
        return f"exited with code {failure.exitcode}"

    def error_of(failure: Any) -> str:
        message = failure.message
        if isinstance(message, dict):
            message = str(message.get("message", ""))
        lines = str(message or "").strip().splitlines()
        return lines[0] if lines and not lines[0].startswith("Signal ") else ""

    def say(line: str) -> None:
        if console is not None:
            console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr)

    error = error_of(first)
    say(f"rank {first_rank} (pid {first.pid}) {how(first)}" + (f": {error}" if error else ""))
    for rank, failure in failures:
        if rank != first_rank:
            error = error_of(failure)
            say(f"  then rank {rank} (pid {failure.pid}) {how(failure)}" + (f": {error}" if error else ""))
    say("every rank has stopped; the last complete checkpoint of the run directory is intact")
    return 2 if codes and all(c == 2 for c in codes) else 1
