"""Subprocess helpers of the tests that install a plugin package with pip into a temporary target."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run(args, *, path, cwd, timeout=300):
    """``args`` in a subprocess with ``PYTHONPATH`` = ``path`` and one torch thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(map(str, path))
    env["OMP_NUM_THREADS"] = "1"
    for var in ("DSK_LOAD_PLUGINS", "DSK_DISABLE_PLUGINS", "DSK_STRICT_PLUGINS"):
        env.pop(var, None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def pip_install_target(package: Path, site: Path, cwd: Path) -> None:
    """``pip install --no-deps --no-build-isolation --no-index --target site package`` (never into the venv)."""
    pip = run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(site), str(package)],
        path=[], cwd=cwd,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout + pip.stderr
