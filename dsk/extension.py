"""Build and load a plugin's C++ extension, or say once why not and let the caller run its PyTorch path.

A native kernel is an optimisation, never a requirement. A module declares its extension at import, which builds
nothing::

    EXTENSION = CppExtension("dsk_rms_norm", [Path(__file__).parent / "csrc" / "rms_norm.cpp"])

and its forward takes the kernel only where both hold::

    if cpu_kernel_supports(x, weight) and (ext := EXTENSION.load()) is not None:
        return ext.rms_norm_forward(...)
    return pytorch_path(x, weight)

:meth:`CppExtension.load` compiles the sources with ``torch.utils.cpp_extension.load`` the first time (tens of
seconds; cached per machine under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and
returns the module, or None where it cannot build or run: ``DSK_CPU_KERNELS=0``, no C++ compiler, no ``ninja``,
a compiler without OpenMP (Apple clang), a torch without its C++ headers, a failed build or import, or a
plugin's own ``requires`` check. Each such case logs exactly one line per extension (logger ``dsk.extension``:
a warning, or info for the deliberate ``DSK_CPU_KERNELS=0``) and never raises. ``python -m dsk.extension
MODULE ...`` imports modules and builds every extension they declare, ahead of time (``make setup``).

Sources are compiled with ``-O3 -fopenmp`` (ATen's ``parallel_for`` is inline OpenMP and needs it in each
translation unit) and see :data:`INCLUDE_DIR` (``dsk/csrc``), whose generic headers give every kernel a GEMM
through ATen (``dsk_gemm.h``) and vectorised ``exp``/sigmoid (``dsk_vec_math.h``).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["INCLUDE_DIR", "CppExtension", "cpu_kernel_supports", "extension_status", "kernels_disabled", "main"]

#: Generic C++ headers shared by the kernels, passed to every build as an include path.
INCLUDE_DIR = Path(__file__).parent / "csrc"

log = logging.getLogger("dsk.extension")

_lock = threading.RLock()
_declared: dict[str, CppExtension] = {}

# torch's build lock is a file that a killed build leaves behind, and every later build of the extension then waits
# for it forever. A build that holds it writes into its directory (objects, the library) at least every minute or
# so (a compile takes 30-100 s on one core); a lock with nothing in its directory written for this long is left over
_STALE_LOCK_S = 4 * 60


# os.environ.get of a missing key raises and catches a KeyError inside (~1 us); this runs on every kernel call of a
# decode step, so the unset case reads the environment's own mapping (CPython's os.environ keeps it as ``_data``)
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("DSK_CPU_KERNELS") if hasattr(os.environ, "encodekey") else None


def kernels_disabled() -> bool:
    """Whether ``DSK_CPU_KERNELS`` (0/false/no/off) turns the native kernels off; read at each call."""
    if _ENV_DATA is not None and _ENV_KEY is not None and _ENV_KEY not in _ENV_DATA:
        return False
    value = os.environ.get("DSK_CPU_KERNELS")
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


def cpu_kernel_supports(*tensors: torch.Tensor) -> bool:
    """Whether a CPU kernel may read these tensors through raw pointers: plain (not subclassed) strided CPU tensors
    or parameters, all float32 or all float64.

    A DTensor, FakeTensor or other tensor subclass, a CUDA or meta tensor, bf16/fp16, mixed dtypes, or code being
    traced by torch.compile -> False, so the caller takes its PyTorch path (which knows how to handle them). Builds
    nothing.
    """
    if not tensors:
        return False
    torch = sys.modules["torch"]  # imported by whoever holds a tensor; this module itself stays torch-free
    if torch.compiler.is_compiling():
        # a pybind call is opaque to torch.compile (a graph break per call): compiled code runs the PyTorch path
        return False
    dtype = tensors[0].dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        return False
    plain, strided = (torch.Tensor, torch.nn.Parameter), torch.strided
    # nn.Parameter(DTensor) is a DTensor instance, so an exact type check also refuses sharded parameters
    for t in tensors:
        if type(t) not in plain or t.dtype is not dtype or t.layout is not strided or t.device.type != "cpu":
            return False
    return True


def _cxx() -> str:
    # torch.utils.cpp_extension compiles with $CXX, else `c++` (MSVC's `cl` on Windows)
    return os.environ.get("CXX", "cl" if sys.platform == "win32" else "c++")


def _find_ninja() -> str | None:
    """Put the environment's ``ninja`` first on PATH (else any found); None when found, else why not.

    torch runs ``ninja`` from PATH; the pip package's binary sits in the environment's bin dir, which is not on
    PATH when the interpreter is called by its path (``.venv/bin/python -m pytest``). It goes first even when the
    system has its own: ninja 1.12 changed the hash in its build log, so processes that ran different ninjas over
    one build directory (a shell with the venv activated, another without) each rebuilt the extension over the
    other's objects, every time.
    """
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if shutil.which("ninja", path=str(directory)):
            path = os.environ.get("PATH", "")
            if path.split(os.pathsep)[0] != str(directory):
                os.environ["PATH"] = str(directory) + os.pathsep + path
            return None
    return None if shutil.which("ninja") else "ninja not found (pip install ninja)"


def _toolchain_problem() -> str | None:
    """Why this machine cannot build an extension at all (compiler, OpenMP, ninja, torch headers), or None."""
    from torch.utils import cpp_extension

    cxx = _cxx()
    words = shlex.split(cxx) if cxx.strip() else []
    compiler = shutil.which(words[-1]) if words else None  # `ccache g++` runs g++ through ccache
    if compiler is None:
        return f"no C++ compiler: {cxx!r} not found (set CXX)"
    if sys.platform == "darwin":
        try:
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            version = ""
        if "Apple clang" in version:
            return f"{cxx} is Apple clang, which has no OpenMP (set CXX to an LLVM or GCC compiler with OpenMP)"
    headers = [Path(p) / "torch" / "extension.h" for p in cpp_extension.include_paths()]
    if not any(h.is_file() for h in headers):
        return "this torch installation has no C++ headers (torch/extension.h)"
    return _find_ninja()


def _build_failure(exc: BaseException) -> str:
    """One line saying why a build or import failed (the compiler's first error, not its whole log)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # the compiler's messages, not ninja's echo of the command lines (which name -fopenmp and every path)
    messages = [line for line in lines if not line.startswith("FAILED") and " -o " not in line]
    errors = [line for line in messages if "error" in line.lower()]
    if any(word in line.lower() for line in errors for word in ("openmp", "omp.h", "-lgomp", "-lomp")):
        return f"the C++ compiler {_cxx()!r} has no OpenMP support"
    detail = (errors or messages or lines or [""])[0]
    return f"build failed ({type(exc).__name__}: {detail[:240]})"


class CppExtension:
    """A C++ extension: declared at import (cheap), built and imported on the first :meth:`load`.

    Args:
        name: the extension's module name, unique in the process and on the machine's build cache (``dsk_<plugin>``).
        sources: its ``.cpp`` files; the directories of the sources and :data:`INCLUDE_DIR` are include paths.
        requires: an optional check run before building; it returns why this torch or machine cannot run the
            kernel (``"torch has no MKL"``) or None.

    Declaring one name twice with other sources raises ValueError; with the same sources it is the same extension.
    """

    def __new__(
        cls, name: str, sources: Sequence[str | Path], *, requires: Callable[[], str | None] | None = None
    ) -> CppExtension:
        paths = tuple(Path(s).resolve() for s in sources)
        with _lock:
            existing = _declared.get(name)
            if existing is not None:
                if existing.sources != paths:
                    raise ValueError(f"C++ extension {name!r} is already declared with other sources")
                return existing
            self = super().__new__(cls)
            self.name, self.sources, self.requires = name, paths, requires
            self._module: ModuleType | None = None
            self._reason: str | None = None
            self._tried = False
            self._told_disabled = False
            _declared[name] = self
            return self

    def __repr__(self) -> str:
        return f"CppExtension({self.name!r}, {[str(s) for s in self.sources]})"

    def load(self, verbose: bool = False) -> ModuleType | None:
        """The compiled module, building it on the first call (thread-safe, once per process); None when the
        kernel cannot build or run here, after one notice line saying why (see the module docstring)."""
        if kernels_disabled():
            if not self._told_disabled:
                with _lock:
                    if not self._told_disabled:
                        self._told_disabled = True
                        log.info(
                            "dsk: C++ extension %r disabled by DSK_CPU_KERNELS=0; the PyTorch path runs", self.name
                        )
            return None
        if self._tried:
            return self._module
        with _lock:
            if not self._tried:
                self._module, self._reason = self._build(verbose)
                self._tried = True
                if self._module is None:
                    log.warning("dsk: C++ extension %r unavailable: %s; the PyTorch path runs", self.name, self._reason)
        return self._module

    def status(self) -> str:
        """One line: ``available``, or ``unavailable: <why>`` (builds it if needed)."""
        if kernels_disabled():
            return "unavailable: disabled by DSK_CPU_KERNELS=0"
        return "available" if self.load() is not None else f"unavailable: {self._reason}"

    def _build(self, verbose: bool) -> tuple[ModuleType | None, str | None]:
        try:
            missing = [str(s) for s in self.sources if not s.is_file()]
            if missing:
                return None, f"source {missing[0]} is missing"
            problem = _toolchain_problem() or (self.requires() if self.requires is not None else None)
            if problem:
                return None, problem
            from torch.utils.cpp_extension import load

            includes = [str(INCLUDE_DIR), *sorted({str(s.parent) for s in self.sources})]
            module = load(
                name=self.name,
                sources=[str(s) for s in self.sources],
                extra_cflags=["-O3", "-fopenmp", f"-DDSK_HEADERS_DIGEST={_headers_digest(includes)}"],
                extra_ldflags=["-fopenmp"],
                extra_include_paths=includes,
                build_directory=str(self._build_directory()),
                verbose=verbose,
            )
            return module, None
        except Exception as exc:  # a failed build or import must not break the run: the PyTorch path stands in
            log.debug("dsk: building C++ extension %r failed", self.name, exc_info=True)
            return None, _build_failure(exc)

    def _build_directory(self) -> Path:
        """This extension's build directory under torch's cache root, one per source tree, Python and torch.

        torch's default (one per name) makes two checkouts or venvs rebuild over each other's objects at every
        import; keyed by the sources' paths each keeps its own build, and ninja rebuilds it when a file changes.
        """
        import torch
        from torch.utils.cpp_extension import get_default_build_root

        key = "\n".join([sys.version.split()[0], torch.__version__, *map(str, self.sources)])
        directory = Path(get_default_build_root()) / f"{self.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / "lock"
        # wait here rather than in torch (which polls for the lock to go, forever): while another process builds,
        # its directory changes; when nothing in it has changed for _STALE_LOCK_S, the lock was left by a killed build
        while lock.exists():
            try:
                latest = max(p.stat().st_mtime for p in directory.iterdir())
            except (FileNotFoundError, ValueError):  # a file went while we looked: look again
                continue
            if time.time() - latest > _STALE_LOCK_S:
                lock.unlink(missing_ok=True)
                log.info("dsk: removed the build lock %s left by an interrupted build", lock)
                break
            time.sleep(0.5)
        return directory


def _headers_digest(include_dirs: Sequence[str]) -> str:
    # torch's build cache keys on the sources and flags only; a digest of the headers in the flags makes an edited
    # header rebuild the extension too
    digest = hashlib.sha1()
    for directory in include_dirs:
        for header in sorted(Path(directory).glob("*.h")):
            digest.update(header.name.encode() + header.read_bytes())
    return digest.hexdigest()[:16]


def load_declared() -> None:
    """Build (or load from the cache) every extension declared so far, unless kernels are disabled.

    A multi-process run calls it once its model exists, on every rank: a build then happens while the ranks wait
    on torch's build lock, not inside a collective or a pipeline's receive that times out while one rank compiles.
    """
    if kernels_disabled():
        return
    for ext in list(_declared.values()):
        ext.load()


def extension_status(name: str) -> str:
    """``status()`` of the extension declared under ``name`` (builds it if needed)."""
    ext = _declared.get(name)
    return "not declared" if ext is None else ext.status()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dsk.extension MODULE ...``: import the modules, build every C++ extension they declare, and print
    one status line per extension. Exit 0 even where one cannot build (the PyTorch path stands in); 2 when a
    module does not import."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in args
    names = [a for a in args if a != "--verbose"]
    if not names:
        print("usage: python -m dsk.extension [--verbose] MODULE [MODULE ...]", file=sys.stderr)
        return 2
    for module in names:
        try:
            importlib.import_module(module)
        except Exception as exc:
            print(f"dsk.extension: cannot import {module}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    for name, ext in sorted(_declared.items()):
        ext.load(verbose=verbose)
        print(f"{name}: {ext.status()}")
    return 0


if __name__ == "__main__":
    # run the registry of the imported `dsk.extension`, not this `__main__` copy of the module
    sys.exit(importlib.import_module("dsk.extension").main())
