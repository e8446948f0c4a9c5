"""dsk.profile.peak: the measured matmul peak is a real GEMM rate on the threads set, and MFU is its ratio."""

import time

import pytest
import torch

from dsk.profile.peak import measure_matmul_peak, mfu


@pytest.fixture
def threads():
    """Restore the intra-op thread count a test changes."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def _one_gemm_rate(n, dtype=torch.float32):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # the first call starts the thread pool
    t0 = time.perf_counter()
    a @ b
    return 2.0 * n**3 / (time.perf_counter() - t0)


def test_cpu_peak_is_a_gemm_rate_near_one_timed_gemm(threads):
    got = measure_matmul_peak("cpu", seconds=0.3)
    assert set(got) >= {"flops_per_s", "dtype", "n", "device", "threads", "seconds"}
    assert got["dtype"] == "float32" and got["device"] == "cpu" and got["threads"] == threads
    assert got["n"] in (512, 1024, 2048, 4096)  # 1024 and up unless one GEMM took over a third of the budget
    assert got["seconds"] >= 0.3 and got["batches"] >= 3  # timed until the budget was spent, best of the batches
    single = _one_gemm_rate(got["n"])
    # the best of several batches beats a lone GEMM unless the machine was busy then; loose bounds, never a timing
    assert 0.5 * single <= got["flops_per_s"] <= 50 * single
    assert 1e8 < got["flops_per_s"] < 1e15


def test_peak_runs_on_the_thread_count_set(threads):
    torch.set_num_threads(1)
    got = measure_matmul_peak("cpu", seconds=0.2)
    assert got["threads"] == 1 == torch.get_num_threads()
    assert got["flops_per_s"] > 0


def test_dtype_by_name_or_object(threads):
    got = measure_matmul_peak("cpu", dtype="float64", seconds=0.1)
    assert got["dtype"] == "float64" and got["flops_per_s"] > 0
    assert measure_matmul_peak("cpu", dtype=torch.float64, seconds=0.05)["dtype"] == "float64"
    with pytest.raises(ValueError, match="'floaty'"):
        measure_matmul_peak("cpu", dtype="floaty")
    with pytest.raises(ValueError, match="seconds"):
        measure_matmul_peak("cpu", seconds=0)


def test_mfu_is_the_model_flop_rate_over_the_peak():
    # 6 GFLOP/token at 1000 tokens/s is 6 TFLOP/s of a 10 TFLOP/s peak
    assert mfu(6e9, 1000.0, 1e13) == pytest.approx(0.6)
    assert mfu(6e9, 0.0, 1e13) == 0.0
    with pytest.raises(ValueError, match="peak_flops_per_s"):
        mfu(1.0, 1.0, 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_is_bf16_8192():
    got = measure_matmul_peak("cuda", seconds=0.5)
    assert got["dtype"] == "bfloat16" and got["n"] == 8192 and got["device"].startswith("cuda")
    assert 0.5 * _cuda_gemm_rate() <= got["flops_per_s"] < 1e16


def _cuda_gemm_rate(n=8192):
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    a @ b
    torch.cuda.synchronize()
    return 2.0 * n**3 / (time.perf_counter() - t0)
