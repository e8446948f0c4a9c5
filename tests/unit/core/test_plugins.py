"""Plugin loading: in-process plugins, provenance, failures that never break the CLI, allow/block lists."""

from __future__ import annotations

import json
import sys
import textwrap
import types

import pytest

from dsk import hookimpl
from dsk.plugins import PluginLoadError, make_plugin_manager
from dsk.registry import LookupFailed, RegistryError, build_registry
from dsk.testing import isolated_plugin_manager, run_dsk

from . import toy_plugin


def _plugin(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, hookimpl(fn))
    return mod


def test_in_process_plugin_components_carry_their_provider():
    pm = make_plugin_manager(entrypoints=False, plugins=[toy_plugin])
    registry = build_registry(pm)
    spec = registry.get("router", "toy_router")
    assert spec.provider == toy_plugin.__name__
    assert spec.summary == "a toy router"
    assert registry.get("trainer", "toy_trainer").config is toy_plugin.ToyTrainerConfig


def test_plugins_json_lists_provider_components_and_hooks():
    pm = isolated_plugin_manager(toy_plugin)
    result = run_dsk(["plugins", "--json"], pm=pm)
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["plugins"]}
    toy = rows[toy_plugin.__name__]
    assert toy["status"] == "loaded"
    assert "router/toy_router" in toy["provides"]
    assert "register_trainers" in toy["hooks"]
    # built-ins come from the dsk distribution's entry points, with its version
    assert rows["moe"]["distribution"] == "dsk" and rows["moe"]["version"]


def test_plugin_that_fails_to_import_is_listed_and_cli_keeps_working(tmp_path):
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    pm = isolated_plugin_manager(toy_plugin, local=(str(broken),))
    result = run_dsk(["plugins"], pm=pm)
    assert result.exit_code == 0
    assert "broken_plugin" in result.stdout and "failed" in result.stdout
    assert "libcuda.so.1" in result.stdout
    assert "plugin(s) failed to load" in result.stdout
    listed = run_dsk(["components", "router"], pm=pm)
    assert listed.exit_code == 0 and "router/toy_router" in listed.stdout


def test_local_plugin_file_through_the_cli_option(tmp_path):
    local = tmp_path / "my_router.py"
    local.write_text(
        textwrap.dedent(
            """
            from dsk import hookimpl
            from dsk.api import BaseConfig

            class SinkhornConfig(BaseConfig):
                iters: int = 3

            @hookimpl
            def register_model_components(register):
                register("router", "sinkhorn", "os:getcwd", config=SinkhornConfig, summary="Sinkhorn routing")
            """
        )
    )
    from click.testing import CliRunner

    from dsk.cli import cli

    result = CliRunner().invoke(cli, ["--plugin", str(local), "components", "show", "router/sinkhorn"])
    assert result.exit_code == 0, result.output
    assert "iters" in result.stdout and "Sinkhorn routing" in result.stdout


def test_misspelled_hook_is_a_failure_with_a_suggestion():
    def register_model_component(register):  # missing the final "s"
        pass

    bad = _plugin("typo_plugin", register_model_component=register_model_component)
    pm = make_plugin_manager(entrypoints=False, plugins=[bad, toy_plugin])
    info = pm.infos["typo_plugin"]
    assert info.status == "failed"
    assert "unknown hook 'register_model_component'" in info.error
    assert "did you mean 'register_model_components'" in info.error
    # the good plugin is unaffected
    assert build_registry(pm).get("router", "toy_router")


def test_hook_with_arguments_not_in_the_spec_is_a_failure():
    def register_trainers(register, oops):
        pass

    bad = _plugin("bad_args", register_trainers=register_trainers)
    pm = make_plugin_manager(entrypoints=False, plugins=[bad])
    assert pm.infos["bad_args"].status == "failed"
    assert "oops" in pm.infos["bad_args"].error


def test_registering_a_kind_from_the_wrong_hook_fails_that_plugin_only():
    def register_trainers(register):
        register("router", "sneaky", "os:getcwd")

    bad = _plugin("wrong_kind", register_trainers=register_trainers)
    pm = make_plugin_manager(entrypoints=False, plugins=[bad, toy_plugin])
    registry = build_registry(pm)
    assert pm.infos["wrong_kind"].status == "failed"
    assert "that hook registers trainer" in pm.infos["wrong_kind"].error
    assert registry.names("router") == ["toy_router"]


def test_strict_mode_re_raises(monkeypatch):
    monkeypatch.setenv("DSK_STRICT_PLUGINS", "1")

    def register_model_component(register):
        pass

    with pytest.raises(PluginLoadError):
        make_plugin_manager(
            entrypoints=False, plugins=[_plugin("typo2", register_model_component=register_model_component)]
        )


def test_two_providers_of_one_name_are_ambiguous_not_a_crash():
    def reg_a(register):
        register("router", "dup", "os:getcwd", config=toy_plugin.ToyRouterConfig)

    a = _plugin("plugin_a", register_model_components=reg_a)
    b = _plugin("plugin_b", register_model_components=reg_a)
    pm = make_plugin_manager(entrypoints=False, plugins=[a, b])
    registry = build_registry(pm)
    assert registry.conflicts() == [("router", "dup", ["plugin_a", "plugin_b"])]
    with pytest.raises(LookupFailed) as err:
        registry.get("router", "dup")
    assert "provided by both 'plugin_a' and 'plugin_b'" in err.value.message
    assert '"plugin_a:dup"' in err.value.hint
    assert registry.get("router", "plugin_b:dup").provider == "plugin_b"
    listing = run_dsk(["plugins"], pm=pm)
    assert listing.exit_code == 0 and "conflict" in listing.stdout


def test_unknown_name_suggests_and_hints_at_other_kind():
    registry = build_registry(make_plugin_manager(entrypoints=False, plugins=[toy_plugin]))
    with pytest.raises(LookupFailed) as err:
        registry.get("router", "toy_rooter")
    assert "did you mean 'toy_router'" in err.value.hint
    with pytest.raises(LookupFailed) as err:
        registry.get("trainer", "toy_router")
    assert "'toy_router' is a router, not a trainer" in err.value.hint


def test_alias_clashing_with_a_name_is_rejected():
    def reg(register):
        register("router", "r1", "os:getcwd")
        register("router", "r2", "os:getcwd", aliases=("r1",))

    pm = make_plugin_manager(entrypoints=False, plugins=[_plugin("aliases", register_model_components=reg)])
    build_registry(pm)
    assert pm.infos["aliases"].status == "failed"
    assert "alias 'r1'" in pm.infos["aliases"].error
    assert RegistryError  # the error type raised inside registration


def _fake_distribution(tmp_path, monkeypatch, dist: str, ep_name: str, module: str, body: str):
    """A distribution on sys.path with a dsk entry point, as `pip install` would leave it."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(body)
    info = site / f"{dist.replace('-', '_')}-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(f"[dsk]\n{ep_name} = {module}\n")
    monkeypatch.syspath_prepend(str(site))
    import importlib

    importlib.invalidate_caches()


def test_entry_point_plugin_from_a_third_party_distribution(tmp_path, monkeypatch):
    body = textwrap.dedent(
        """
        from dsk import hookimpl
        @hookimpl
        def register_rewards(register):
            register("reward", "ext_reward", "os:getcwd", summary="from a wheel")
        """
    )
    _fake_distribution(tmp_path, monkeypatch, "dsk-ext", "ext", "dsk_ext_mod", body)
    pm = make_plugin_manager()
    assert pm.infos["ext"].distribution == "dsk-ext" and pm.infos["ext"].version == "0.3.1"
    spec = build_registry(pm).get("reward", "ext_reward")
    assert spec.distribution == "dsk-ext" and spec.provider == "ext"


def test_allow_list_is_applied_before_import(tmp_path, monkeypatch):
    body = "import sys\nsys.modules['__dsk_slow_imported__'] = True\n"
    _fake_distribution(tmp_path, monkeypatch, "dsk-slow", "slow", "dsk_slow_mod", body)
    monkeypatch.setenv("DSK_LOAD_PLUGINS", "moe")
    pm = make_plugin_manager()
    assert "__dsk_slow_imported__" not in sys.modules
    assert pm.infos["slow"].status == "blocked"
    assert pm.infos["moe"].status == "loaded"
    assert pm.infos["mtp"].status == "blocked"


def test_empty_allow_list_loads_no_entry_point_and_cli_still_works(monkeypatch):
    monkeypatch.setenv("DSK_LOAD_PLUGINS", "")
    from click.testing import CliRunner

    from dsk.cli import cli

    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    assert "no plugins loaded" in result.stdout


def test_block_list_skips_named_plugins(tmp_path, monkeypatch):
    body = "import sys\nsys.modules['__dsk_blocked_imported__'] = True\n"
    _fake_distribution(tmp_path, monkeypatch, "dsk-blocked", "blockme", "dsk_blocked_mod", body)
    monkeypatch.setenv("DSK_DISABLE_PLUGINS", "dsk-blocked,mtp")
    pm = make_plugin_manager()
    assert "__dsk_blocked_imported__" not in sys.modules
    assert pm.infos["blockme"].status == "blocked" and pm.infos["mtp"].status == "blocked"
    result = run_dsk(["plugins", "--all", "--json"], pm=pm)
    statuses = {r["name"]: r["status"] for r in json.loads(result.stdout)["plugins"]}
    assert statuses["blockme"] == "blocked"


def test_registration_that_raises_marks_the_plugin_failed():
    def reg(register):
        raise RuntimeError("boom in registration")

    pm = make_plugin_manager(entrypoints=False, plugins=[_plugin("raiser", register_features=reg), toy_plugin])
    registry = build_registry(pm)
    assert pm.infos["raiser"].status == "failed" and "boom in registration" in pm.infos["raiser"].error
    assert registry.get("feature", "toy_feature")


def test_plugin_commands_are_added_through_the_hook():
    import click

    @click.command("hello")
    def hello():
        """Say hello."""
        click.echo("hello from a plugin")

    def register_commands(cli):
        cli.add_command(hello)

    pm = make_plugin_manager(entrypoints=False, plugins=[_plugin("cmds", register_commands=register_commands)])
    from click.testing import CliRunner

    from dsk.cli import App, cli

    result = CliRunner().invoke(cli, ["hello"], obj=App(pm=pm))
    assert result.exit_code == 0 and "hello from a plugin" in result.stdout
    listing = CliRunner().invoke(cli, ["--help"], obj=App(pm=pm))
    assert "Say hello." in listing.stdout
    # another invocation with another plugin manager does not see it
    other = CliRunner().invoke(cli, ["hello"], obj=App(pm=make_plugin_manager(entrypoints=False)))
    assert other.exit_code == 2
