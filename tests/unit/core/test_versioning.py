"""The versioning policy (docs/versioning.md): a plugin built for another dsk is listed as incompatible and not
imported; one whose requirement admits this dsk loads; a deprecated API warns, naming its replacement."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

import dsk
from dsk.api import DskDeprecationWarning, warn_deprecated
from dsk.plugins import make_plugin_manager
from dsk.testing import run_dsk


def _fake_distribution(root: Path, name: str, requires: list[str]) -> None:
    """An installed distribution ``name`` with a ``dsk`` entry point to module ``<name>_plugin``, which raises when
    imported (so a test sees whether dsk imported it)."""
    dist = root / f"{name}-1.0.dist-info"
    dist.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0", *(f"Requires-Dist: {r}" for r in requires)]
    (dist / "METADATA").write_text("\n".join(lines) + "\n")
    (dist / "entry_points.txt").write_text(f"[dsk]\n{name} = {name}_plugin\n")
    (root / f"{name}_plugin.py").write_text(f"raise ImportError('{name} was imported')\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.endswith("_plugin") and m.startswith("fake")]:
        del sys.modules[mod]


def test_a_plugin_for_another_dsk_is_incompatible_and_not_imported(site):
    _fake_distribution(site, "fakefuture", ["dsk>=99.0", "numpy"])
    pm = make_plugin_manager(allow={"fakefuture"})
    info = pm.infos["fakefuture"]
    assert info.status == "incompatible"
    assert f"built for dsk>=99.0 and this is dsk {dsk.__version__}" in info.error
    assert pm.incompatible() == [info] and not pm.failures()  # never imported, so it did not fail


def test_a_plugin_whose_requirement_admits_this_dsk_is_loaded(site):
    _fake_distribution(site, "fakecurrent", [f"dsk>={dsk.__version__}", "dsk<99 ; extra == 'never'"])
    pm = make_plugin_manager(allow={"fakecurrent"})
    # it was imported (its module raises on import, so it is recorded as failed with that error)
    assert pm.infos["fakecurrent"].status == "failed"
    assert "fakecurrent was imported" in pm.infos["fakecurrent"].error


def test_dsk_plugins_says_what_to_do(site, monkeypatch):
    _fake_distribution(site, "fakeold", ["dsk<0.0.1"])
    monkeypatch.setenv("DSK_LOAD_PLUGINS", "dsk,fakeold")
    pm = make_plugin_manager()
    shown = run_dsk(["plugins"], pm=pm)
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.stdout.split())
    assert "incompatible" in text and "built for dsk<0.0.1" in text and "install a release of fakeold" in text
    rows = {r["name"]: r for r in json.loads(run_dsk(["plugins", "--json"], pm=pm).stdout)["plugins"]}
    assert rows["fakeold"]["status"] == "incompatible"


def test_a_deprecated_api_warns_naming_its_replacement():
    def old_api():
        warn_deprecated("dsk.api.old_thing", "dsk.api.new_thing", since="0.1", removed_in="0.3")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old_api()
    assert len(caught) == 1 and issubclass(caught[0].category, DskDeprecationWarning)
    message = str(caught[0].message)
    assert "dsk.api.old_thing is deprecated since dsk 0.1" in message and "use dsk.api.new_thing" in message
    assert caught[0].filename == __file__  # points at the caller of the deprecated API
