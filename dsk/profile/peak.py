"""The dense matmul peak of this machine, measured, and the model FLOP utilisation against it.

MFU is the model's FLOPs per token times tokens/s over what the hardware can do. A datasheet peak means little on a
laptop CPU (turbo, AVX width, thread count), so ``dsk profile`` measures the achievable rate instead: square GEMMs
of one size, after a warm-up, timed in batches for about ``seconds``; the best batch is the peak (the others lost
time to the rest of the machine). An ``n x n`` by ``n x n`` GEMM is ``2 n^3`` FLOPs (a multiply and an add per
term), the convention of the analytic counts it is compared with.

* CPU: float32, on ``torch.get_num_threads()`` threads as they are set (the caller sets the run's thread count);
  ``n = 1024``, doubled (up to 4096) while one GEMM takes under 5 ms, so the per-call overhead is noise. Not
  smaller on a fast machine: on a loaded one, two threads that wait for each other make a small GEMM take a
  scheduler quantum (a 256 GEMM at 2 GFLOP/s). Other dtypes start at 256 (bfloat16 without AVX512-BF16 is
  emulated, at ~1 GFLOP/s), and any ``n`` is halved (down to 256) while one GEMM takes over a third of ``seconds``.
* CUDA: bfloat16, ``n = 8192``, the device synchronised around each batch (kernels launch asynchronously).
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["measure_matmul_peak", "mfu"]

_CPU_START_N, _CPU_MIN_N, _CPU_MAX_N = 1024, 256, 4096
_CPU_MIN_GEMM_S = 5e-3
_CUDA_N = 8192
_MIN_BATCHES = 3


def measure_matmul_peak(device: str = "cpu", dtype: Any = None, seconds: float = 1.0) -> dict[str, Any]:
    """The best dense matmul rate measured on ``device`` over about ``seconds`` of timed GEMMs.

    Args:
        device: a torch device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: a ``torch.dtype`` or its name; None for float32 on a CPU, bfloat16 on a GPU.
        seconds: the timed part's length (the warm-up comes on top); at least three batches are timed.

    Returns:
        ``{"flops_per_s", "dtype", "n", "device", "threads", "seconds", "batches", "gemms_per_batch"}``: the best
        batch's rate, the dtype's name, the GEMM size, the device, the intra-op thread count it ran on and the
        seconds timed in all.
    """
    import torch

    if not seconds > 0:
        raise ValueError(f"seconds = {seconds!r}: must be > 0")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if cuda else torch.float32
    elif isinstance(dtype, str):
        name, dtype = dtype, getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype = {name!r}: not a torch dtype name")

    def sync() -> None:  # a GPU runs kernels asynchronously: time from launch to completion
        if cuda:
            torch.cuda.synchronize(dev)
        elif dev.type == "mps":
            torch.mps.synchronize()

    def run(a: Any, b: Any, c: Any, k: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(k):
            torch.mm(a, b, out=c)  # into one output: no allocation timed
        sync()
        return time.perf_counter() - t0

    g = torch.Generator(device=dev).manual_seed(0)

    def probe(n: int) -> tuple[Any, Any, Any, float]:
        a, b = (torch.randn(n, n, generator=g, device=dev, dtype=dtype) for _ in range(2))
        c = torch.empty(n, n, device=dev, dtype=dtype)
        run(a, b, c, 1)  # first call: thread pool start, BLAS/cuBLAS handle and workspace
        return a, b, c, run(a, b, c, 1)

    with torch.no_grad():
        n = _CUDA_N if cuda else _CPU_START_N if dtype in (torch.float32, torch.float64) else _CPU_MIN_N
        a, b, c, one = probe(n)
        while not cuda and one < _CPU_MIN_GEMM_S and n < _CPU_MAX_N:
            n *= 2
            a, b, c, one = probe(n)
        while not cuda and one > seconds / _MIN_BATCHES and n > _CPU_MIN_N:
            n //= 2
            a, b, c, one = probe(n)
        # warm-up: a tenth of the budget (clocks up, caches hot), then batches of about a fifth of it each
        per_batch = max(1, round(0.2 * seconds / max(one, 1e-9)))
        run(a, b, c, max(1, round(0.1 * seconds / max(one, 1e-9))))
        best, timed, batches = 0.0, 0.0, 0
        while batches < _MIN_BATCHES or timed < seconds:
            t = run(a, b, c, per_batch)
            timed += t
            batches += 1
            best = max(best, 2.0 * n**3 * per_batch / t)
    return {
        "flops_per_s": best,
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "seconds": timed,
        "batches": batches,
        "gemms_per_batch": per_batch,
    }


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOP utilisation: the model's FLOP rate (FLOPs per token x tokens/s) over the peak rate."""
    if not peak_flops_per_s > 0:
        raise ValueError(f"peak_flops_per_s = {peak_flops_per_s!r}: must be > 0")
    return flops_per_token * tokens_per_s / peak_flops_per_s
