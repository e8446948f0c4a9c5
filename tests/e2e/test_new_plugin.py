"""The ``dsk new-plugin`` round trip: a generated router package installs with pip, its own tests pass, ``dsk plugins``
lists it and its example recipe trains; every other kind's generated package passes its own tests in place.

pip installs into a temporary ``--target`` (never into the shared .venv, which other test workers see), offline
(``--no-index``), and every command runs in a subprocess with ``PYTHONPATH`` pointing there.
"""

from __future__ import annotations

import json
import sys

import pytest

from dsk.api import KINDS
from tests.e2e.plugin_install import pip_install_target, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("subprocess-train")]


def new_plugin(name, kind, where):
    proc = run(
        [sys.executable, "-m", "dsk", "new-plugin", name, "--kind", kind, "--dir", str(where)], path=[], cwd=where
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return where / name


def test_a_generated_router_installs_passes_its_tests_is_listed_and_trains(tmp_path):
    package = new_plugin("dsk-trip-router", "router", tmp_path)
    site = tmp_path / "site"
    pip_install_target(package, site, tmp_path)
    assert (site / "dsk_trip_router" / "router.py").exists()

    # its own tests, against the installed copy (run from the tests folder, so the source tree is not imported)
    tests = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
                path=[site], cwd=package / "tests")  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "5 passed" in tests.stdout
    assert (
        str(site)
        in run(
            [sys.executable, "-c", "import dsk_trip_router; print(dsk_trip_router.__file__)"], path=[site], cwd=tmp_path
        ).stdout
    )

    listing = run([sys.executable, "-m", "dsk", "plugins", "--json"], path=[site], cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    plugins = {p["name"]: p for p in json.loads(listing.stdout)["plugins"]}
    mine = plugins["trip_router"]
    assert mine["status"] == "loaded" and mine["distribution"] == "dsk-trip-router" and mine["version"] == "0.1.0"
    assert mine["provides"] == ["router/trip_router"]

    run_dir = tmp_path / "run"
    train = run(
        [sys.executable, "-m", "dsk", "train", str(package / "recipes" / "example.toml"), "--run-dir", str(run_dir),
         "--json"],
        path=[site], cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout + train.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 6 and all(loss == loss and loss > 0 for loss in losses)
    assert any("moe/maxvio" in r for r in rows if r["kind"] == "train")  # the router's load statistics arrived
    resolved = (run_dir / "resolved.toml").read_text()
    assert 'type = "trip_router"' in resolved


def test_every_other_kind_passes_its_own_tests_in_place(tmp_path):
    kinds = [k for k in KINDS if k != "router"]
    packages = [new_plugin(f"dsk-trip-{kind}", kind, tmp_path) for kind in kinds]
    # one interpreter for all of them: each package's test file has its own name (tests/test_<package>.py)
    proc = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *(str(p / "tests") for p in packages)],
        path=packages, cwd=tmp_path, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    for kind in kinds:
        assert f"test_dsk_trip_{kind}.py::" in proc.stdout, kind  # its tests ran (-rA lists each)
    assert " failed" not in proc.stdout and " error" not in proc.stdout
