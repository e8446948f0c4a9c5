"""Deliberately broken plugins: ``dsk plugins`` and the contract suites say what is wrong and what to fix.

Four kinds of breakage, each a plugin file loaded with ``--plugin`` next to a healthy one: a component registered
under the wrong kind, a config without defaults, a module that fails to import, and an implementation that
breaks its kind's contract.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

from dsk.api import BaseConfig
from dsk.testing import isolated_plugin_manager, run_dsk
from dsk.testing.contracts.model import check_config_round_trip, check_router

WRONG_KIND = """
from dsk import hookimpl

@hookimpl
def register_model_components(register):
    register("routr", "mine", "os:getcwd")
"""

WRONG_HOOK = """
from dsk import hookimpl

@hookimpl
def register_features(register):
    register("router", "mine", "os:getcwd")
"""

NO_DEFAULTS = """
from pydantic import BaseModel
from dsk import hookimpl
from dsk.api import BaseConfig

class NeedsK(BaseConfig):
    k: int

class Loose(BaseModel):
    k: int = 2

@hookimpl
def register_model_components(register):
    register("router", "needs_k", "os:getcwd", config=NeedsK)
    register("router", "loose", "os:getcwd", config=Loose)
    register("router", "typo", "no_such_package.router:Router")
"""

FAILS_TO_IMPORT = """
import dsk_nonexistent_dependency  # noqa: F401
"""


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def broken(tmp_path):
    files = {
        "wrong_kind": WRONG_KIND,
        "wrong_hook": WRONG_HOOK,
        "no_defaults": NO_DEFAULTS,
        "fails_to_import": FAILS_TO_IMPORT,
    }
    return isolated_plugin_manager(local=tuple(_write(tmp_path, n, t) for n, t in files.items()))


def test_dsk_plugins_lists_every_broken_plugin_with_what_to_fix(broken):
    result = run_dsk(["plugins", "--json"], pm=broken)
    assert result.exit_code == 0, result.stderr
    rows = {r["name"].rsplit(".", 1)[-1]: r for r in json.loads(result.stdout)["plugins"]}
    wrong_kind = rows["wrong_kind"]
    assert wrong_kind["status"] == "failed"
    assert "registered kind 'routr' from register_model_components" in wrong_kind["error"]
    assert "did you mean 'router'?" in wrong_kind["error"]
    wrong_hook = rows["wrong_hook"]
    assert wrong_hook["status"] == "failed"
    assert "kind 'router' from register_features" in wrong_hook["error"]
    assert "register it from register_model_components" in wrong_hook["error"]
    failing = rows["fails_to_import"]
    assert failing["status"] == "failed" and "dsk_nonexistent_dependency" in failing["error"]
    # the config problems do not stop the plugin loading: they are warnings naming the component and the fix
    no_defaults = rows["no_defaults"]
    assert no_defaults["status"] == "loaded"
    warnings = "\n".join(no_defaults["warnings"])
    assert "router/needs_k: option 'k' of NeedsK has no default" in warnings
    assert "give each a default" in warnings
    assert "router/loose: Loose accepts unknown keys" in warnings and "subclass dsk.api.BaseConfig" in warnings
    assert "router/typo: implementation 'no_such_package.router:Router' cannot be loaded" in warnings
    # dsk's own components are not flagged (they are held to the contracts by dsk's tests)
    assert all(not r["warnings"] for name, r in rows.items() if r["distribution"] == "dsk")


def test_dsk_plugins_text_shows_failures_and_warnings(broken):
    result = run_dsk(["plugins"], pm=broken)
    assert result.exit_code == 0, result.stderr
    out = " ".join(result.stdout.split())  # the table wraps long cells
    assert "3 plugin(s) failed to load" in out
    assert "(3 warnings)" in out
    assert "warning:" in out and "option 'k' of NeedsK has no default" in out
    assert "did you mean 'router'?" in out


def test_a_recipe_that_leaves_out_an_option_without_default_is_exit_2_at_its_key_path(broken, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model.ffn]\ntype = "moe"\n[model.ffn.router]\ntype = "needs_k"\n')
    result = run_dsk(["recipe", "validate", str(recipe)], pm=broken)
    assert result.exit_code == 2
    assert "model.ffn.router.k" in result.stderr and "Traceback" not in result.stderr


class _NoDefault(BaseConfig):
    top_k: int


def test_the_config_contract_names_the_field_without_default():
    with pytest.raises(AssertionError, match=r"_NoDefault\.top_k has no default.*give every field a default"):
        check_config_round_trip(_NoDefault, {})


class _BrokenRouter(nn.Module):
    """Returns float expert indices and weights that do not depend on the input: two contract breaks."""

    def __init__(self, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.gate = nn.Linear(8, n_experts, bias=False)

    def forward(self, x, seq_shape=None):
        n = x.shape[0]
        experts = torch.arange(self.top_k).repeat(n, 1).float()
        return torch.full((n, self.top_k), 1.0 / self.top_k), experts, {}


def test_the_router_contract_says_what_to_fix_in_a_broken_router():
    with pytest.raises(AssertionError) as info:
        check_router(lambda: _BrokenRouter(4, 2), n_experts=4, dim=8, top_k=2)
    assert "returned experts of dtype float32; return int64 expert ids" in str(info.value)
