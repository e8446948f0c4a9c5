"""The example external plugin examples/plugins/dsk-sinkhorn: it installs with pip, its own tests pass, ``dsk plugins``
lists it, its recipe trains a few steps with the router's MaxVio in the metrics rows, and ``dsk profile`` reports
its per-expert loads.

pip installs into a temporary ``--target`` (never into the shared .venv, which other test workers see), offline
(``--no-index``), and every command runs in a subprocess with ``PYTHONPATH`` pointing there.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.e2e.plugin_install import pip_install_target, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("subprocess-train")]

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "examples" / "plugins" / "dsk-sinkhorn"


def test_the_sinkhorn_example_installs_passes_its_tests_is_listed_and_trains(tmp_path):
    # pip builds in the source folder (build/, *.egg-info): build a copy, so the checkout stays clean and a stale
    # build/lib of an earlier run cannot leak into the wheel
    package = tmp_path / "dsk-sinkhorn"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    pip_install_target(package, site, tmp_path)
    assert (site / "dsk_sinkhorn" / "router.py").exists()
    where = run([sys.executable, "-c", "import dsk_sinkhorn; print(dsk_sinkhorn.__file__)"], path=[site], cwd=tmp_path)
    assert str(site) in where.stdout, where.stdout + where.stderr

    # its own tests, against the installed copy (run from the tests folder, so the source tree is not imported)
    tests = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(package / "tests")],
                path=[site], cwd=package / "tests")  # fmt: skip
    assert tests.returncode == 0, tests.stdout[-6000:] + tests.stderr[-2000:]
    assert "test_meets_the_router_contract" in tests.stdout and " passed" in tests.stdout
    assert " failed" not in tests.stdout and " error" not in tests.stdout

    listing = run([sys.executable, "-m", "dsk", "plugins", "--json"], path=[site], cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    plugins = {p["name"]: p for p in json.loads(listing.stdout)["plugins"]}
    mine = plugins["sinkhorn"]
    assert mine["status"] == "loaded" and mine["distribution"] == "dsk-sinkhorn" and mine["version"] == "0.1.0"
    assert mine["provides"] == ["router/sinkhorn"]
    text = run([sys.executable, "-m", "dsk", "plugins"], path=[site], cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.startswith("sinkhorn "))
    assert line.split()[:4] == ["sinkhorn", "0.1.0", "loaded", "router/sinkhorn"]
    # without the install it is not there (the listing above is the plugin's doing)
    bare = run([sys.executable, "-m", "dsk", "plugins", "--json"], path=[], cwd=tmp_path)
    assert "sinkhorn" not in {p["name"] for p in json.loads(bare.stdout)["plugins"]}

    run_dir = tmp_path / "run"
    train = run(
        [sys.executable, "-m", "dsk", "train", str(PACKAGE / "recipes" / "sinkhorn.toml"), "--run-dir", str(run_dir),
         "--set", "trainer.steps=8", "--set", "trainer.eval_samples=8", "--set", "trainer.eval_max_new_tokens=16",
         "--json"],
        path=[site], cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout[-4000:] + train.stderr[-4000:]
    resolved = (run_dir / "resolved.toml").read_text()
    assert 'type = "sinkhorn"' in resolved and "n_iters = 8" in resolved
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 8 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in train_rows)
    for r in train_rows:  # the router's load statistics arrived: per MoE layer and aggregated
        layers = [k for k in r if k.startswith("moe/layer") and k.endswith("/maxvio")]
        assert len(layers) == 2, sorted(r)
        assert all(0 <= r[k] < 8 for k in layers) and r["moe/maxvio"] >= 0

    # dsk profile sums the per-expert loads the router reports (each MoE layer's, the MTP block's included)
    prof = run(
        [sys.executable, "-m", "dsk", "profile", str(PACKAGE / "recipes" / "sinkhorn.toml"), "--steps", "2",
         "--warmup", "1", "--out", str(tmp_path / "profile"), "--json"],
        path=[site], cwd=tmp_path,
    )  # fmt: skip
    assert prof.returncode == 0, prof.stdout[-4000:] + prof.stderr[-4000:]
    report = json.loads(prof.stdout)
    loads = report["expert_load"]
    assert {"layers.1", "layers.2"} <= set(loads), sorted(loads)
    for name, load in loads.items():
        assert len(load) == 8 and sum(load) > 0, (name, load)
        assert 0 <= report["maxvio"][name] < 8, (name, report["maxvio"])
