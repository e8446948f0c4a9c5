"""Process-wide setup of a training process, done once by :func:`dsk.train.runner.run_recipe` (and the benches)."""

from __future__ import annotations

import os
import sys

__all__ = ["tune_process", "pin_malloc_thresholds"]


def tune_process() -> dict[str, bool]:
    """Set what a training process wants from its runtime; returns what was applied (``{"malloc_pinned": ...}``).

    Safe to call more than once and from any rank; touches nothing but this process.
    """
    return {"malloc_pinned": pin_malloc_thresholds()}


def pin_malloc_thresholds() -> bool:
    """Fix glibc malloc's mmap and trim thresholds for a training process; True when applied.

    glibc raises its mmap threshold each time a large mmapped block is freed and trims the heap top past twice
    that, so which buffers come back as fresh pages (a page fault per 4 KiB) depends on the history of frees. A
    training step allocates and frees the same large activations every step; with the thresholds pinned high
    they are reused from the heap instead. Measured on the whole-model step of ``bench/bench_model.py`` (2
    threads, separate processes): dsk 72.7 ms unpinned, 61-64 ms pinned. The benches pin it so that both sides
    of a row, which share the process, run under the same allocator policy. The cost: freed memory stays in the
    process (it is reused by the next step). ``DSK_PIN_MALLOC=0`` turns it off; other C libraries (macOS, musl,
    Windows) are left alone, and so is a Linux without ``libc.so.6``.
    """
    if os.environ.get("DSK_PIN_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc's soname; musl and others have no mallopt thresholds
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
