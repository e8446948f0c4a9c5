"""dsk.extension: a C++ extension that cannot build or run gives None with one notice, and the PyTorch path runs."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

import dsk.extension as extension
from dsk.extension import CppExtension, cpu_kernel_supports
from dsk.model import norm

ROOT = Path(__file__).resolve().parents[3]
KERNEL_SOURCES = [
    ROOT / "dsk" / "extension.py",
    ROOT / "dsk" / "model" / "norm.py",
    ROOT / "plugins" / "dsk_moe" / "kernels.py",
    ROOT / "plugins" / "dsk_mla" / "kernels.py",
    *sorted((ROOT / "dsk" / "csrc").glob("*.h")),
    *sorted((ROOT / "dsk" / "model" / "csrc").glob("*.cpp")),
    *sorted((ROOT / "plugins" / "dsk_moe" / "csrc").glob("*.*")),
    *sorted((ROOT / "plugins" / "dsk_mla" / "csrc").glob("*.*")),
]


def fresh_name() -> str:
    return f"dsk_test_{uuid.uuid4().hex[:12]}"  # a name no earlier build in this process or cache has used


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dsk.extension" and r.levelno >= logging.INFO]


def reference_rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.fixture
def tmp_build(tmp_path, monkeypatch):
    """A private torch extensions cache, so that failed builds leave nothing in the user's."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    monkeypatch.delenv("DSK_CPU_KERNELS", raising=False)
    return tmp_path


def test_a_missing_compiler_gives_none_with_one_notice_and_the_pytorch_path_runs(tmp_build, monkeypatch, caplog):
    source = tmp_build / "kernel.cpp"
    source.write_text("#include <torch/extension.h>\n")
    monkeypatch.setenv("CXX", str(tmp_build / "no-such-compiler"))
    ext = CppExtension(fresh_name(), [source])
    monkeypatch.setattr(norm, "EXTENSION", ext)  # RMSNorm's kernel is now one that cannot build
    layer = norm.RMSNorm(8).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="dsk.extension"):
        assert ext.load() is None
        y = layer(x)
        layer(x)
    torch.testing.assert_close(y, reference_rms_norm(x, layer.weight, layer.eps), rtol=1e-12, atol=1e-12)
    [notice] = notices(caplog)
    assert ext.name in notice and "no C++ compiler" in notice and "no-such-compiler" in notice
    assert "PyTorch path runs" in notice
    assert ext.status().startswith("unavailable: no C++ compiler")


def test_a_source_that_fails_to_compile_gives_none_with_the_compiler_error(tmp_build, caplog):
    source = tmp_build / "broken.cpp"
    source.write_text('#error "this kernel does not compile"\n')
    ext = CppExtension(fresh_name(), [source])
    with caplog.at_level(logging.INFO, logger="dsk.extension"):
        assert ext.load() is None
        assert ext.load() is None  # tried once: no second build, no second notice
    [notice] = notices(caplog)
    assert "build failed" in notice and "this kernel does not compile" in notice
    assert "\n" not in notice


def test_disabled_kernels_give_none_with_one_notice_and_build_nothing(tmp_build, monkeypatch, caplog):
    source = tmp_build / "never_built.cpp"
    source.write_text('#error "must not be compiled"\n')
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    ext = CppExtension(fresh_name(), [source])
    with caplog.at_level(logging.INFO, logger="dsk.extension"):
        assert ext.load() is None
        assert ext.load() is None
    [notice] = notices(caplog)
    assert "DSK_CPU_KERNELS=0" in notice and "PyTorch path runs" in notice
    assert not (tmp_build / "torch_extensions").exists()


def test_a_failing_requirement_gives_none_before_building(tmp_build, caplog):
    source = tmp_build / "needs_mkl.cpp"
    source.write_text('#error "must not be compiled"\n')
    ext = CppExtension(fresh_name(), [source], requires=lambda: "this torch has no MKL")
    with caplog.at_level(logging.INFO, logger="dsk.extension"):
        assert ext.load() is None
    [notice] = notices(caplog)
    assert "this torch has no MKL" in notice


def test_one_name_cannot_be_declared_with_other_sources(tmp_path):
    name = fresh_name()
    first = CppExtension(name, [tmp_path / "a.cpp"])
    assert CppExtension(name, [tmp_path / "a.cpp"]) is first
    with pytest.raises(ValueError, match="already declared with other sources"):
        CppExtension(name, [tmp_path / "b.cpp"])


def test_kernel_inputs_are_plain_cpu_float32_or_float64_tensors_of_one_dtype():
    x = torch.zeros(2, 3)
    assert cpu_kernel_supports(x, torch.nn.Parameter(torch.zeros(3)))
    assert cpu_kernel_supports(x.double())
    assert not cpu_kernel_supports(x.bfloat16())
    assert not cpu_kernel_supports(x, x.double())  # one dtype
    assert not cpu_kernel_supports(torch.zeros(2, 3, device="meta"))
    assert not cpu_kernel_supports(x.to_sparse())
    assert not cpu_kernel_supports()

    class Subclass(torch.Tensor):
        pass

    assert not cpu_kernel_supports(x.as_subclass(Subclass))


@pytest.fixture
def one_rank_group(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_dtensor_input_takes_the_pytorch_path(one_rank_group, monkeypatch):
    tensor_api = pytest.importorskip("torch.distributed.tensor")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    layer = norm.RMSNorm(8).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    weight = layer.weight.detach().clone()
    # as a tensor-parallel plan leaves it: activations and the norm's weight are DTensors
    layer.weight = torch.nn.Parameter(tensor_api.distribute_tensor(weight, mesh, [tensor_api.Replicate()]))
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    x_dt = tensor_api.distribute_tensor(x, mesh, [tensor_api.Replicate()])
    assert not cpu_kernel_supports(x_dt, layer.weight) and not cpu_kernel_supports(x, layer.weight)
    calls = []
    monkeypatch.setattr(norm, "rms_norm_kernel", lambda *a: calls.append(1))
    y = layer(x_dt)
    assert not calls and isinstance(y, tensor_api.DTensor)
    torch.testing.assert_close(y.to_local(), reference_rms_norm(x, weight, layer.eps), rtol=1e-12, atol=1e-12)


def test_the_kernels_reach_blas_through_aten_not_through_looked_up_symbols():
    for path in KERNEL_SOURCES:
        text = path.read_text()
        for word in ("ctypes", "dlsym", "sgemm_", "dgemm_", "Set_Num_Threads"):
            assert word not in text, f"{path.relative_to(ROOT)} uses {word}"
    assert any(p.suffix == ".cpp" for p in KERNEL_SOURCES) and any(p.suffix == ".h" for p in KERNEL_SOURCES)


def test_prebuild_entry_reports_each_declared_extension(monkeypatch, capsys):
    monkeypatch.setenv("DSK_CPU_KERNELS", "0")
    assert extension.main(["dsk.model.norm"]) == 0
    assert "dsk_rms_norm: unavailable: disabled by DSK_CPU_KERNELS=0" in capsys.readouterr().out
    assert extension.main(["dsk.no_such_module"]) == 2
    assert "cannot import dsk.no_such_module" in capsys.readouterr().err


def test_a_build_lock_left_by_a_killed_build_does_not_block_forever(tmp_build, caplog):
    source = tmp_build / "after_crash.cpp"
    source.write_text('#error "compiled after the stale lock was cleared"\n')
    ext = CppExtension(fresh_name(), [source])
    lock = ext._build_directory() / "lock"
    lock.touch()  # what torch's file baton leaves when the building process is killed
    old = time.time() - 3600
    for path in lock.parent.iterdir():  # nothing written in the build directory for an hour
        os.utime(path, (old, old))
    result = []
    worker = threading.Thread(target=lambda: result.append(ext.load()), daemon=True)
    with caplog.at_level(logging.INFO, logger="dsk.extension"):
        worker.start()
        worker.join(timeout=120)
    assert result == [None], "load() waited on the stale lock"
    assert any("compiled after the stale lock was cleared" in n for n in notices(caplog))


def test_load_declared_builds_every_declared_extension_up_front(tmp_build):
    """What a multi-process run calls once its model exists: each declared extension has tried its build (this
    one's source does not compile, so it reports why and the PyTorch path stands in)."""
    from dsk.extension import load_declared

    source = tmp_build / "declared.cpp"
    source.write_text('#error "built by load_declared"\n')
    ext = CppExtension(fresh_name(), [source])
    assert not ext._tried
    load_declared()
    assert ext._tried and ext.load() is None
    assert "built by load_declared" in ext.status()
