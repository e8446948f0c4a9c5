"""The command line: recipe show/validate output, components, exit codes, and no torch on the light commands."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dsk.testing import isolated_plugin_manager, run_dsk

from . import toy_plugin


@pytest.fixture
def pm():
    return isolated_plugin_manager(toy_plugin)


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_validate_prints_every_problem_with_value_origin_and_hint(tmp_path, pm):
    write(tmp_path / "base.toml", "[trainer]\ntype = 'toy_trainer'\nstepz = 3\n")
    top = write(tmp_path / "top.toml", "[dsk]\nextends = 'base.toml'\n[data]\ntype='toy_task'\ndigits = 12\n")
    result = run_dsk(["recipe", "validate", top, "--set", "trainer.lr=-2"], pm=pm)
    assert result.exit_code == 2
    err = result.stderr
    assert "has 3 problems" in err
    assert "trainer.stepz = 3" in err and "base.toml" in err and "did you mean 'steps'" in err
    assert "data.digits = 12" in err and "top.toml" in err and "less than or equal to 9" in err
    assert "trainer.lr = -2" in err and "--set #1" in err
    assert "Traceback" not in result.output and result.exception is None


def test_validate_ok_and_json(tmp_path, pm):
    good = write(tmp_path / "good.toml", "[trainer]\ntype = 'toy_trainer'\n")
    bad = write(tmp_path / "bad.toml", "[trainer]\ntype = 'toy_trainerr'\n")
    ok = run_dsk(["recipe", "validate", good], pm=pm)
    assert ok.exit_code == 0 and "ok" in ok.stdout
    both = run_dsk(["recipe", "validate", good, bad, "--json"], pm=pm)
    assert both.exit_code == 2
    reports = json.loads(both.stdout)
    assert reports[0]["ok"] is True
    assert reports[1]["problems"][0]["path"] == "trainer.type"
    assert "did you mean 'toy_trainer'" in reports[1]["problems"][0]["hint"]


def test_missing_recipe_file_is_exit_2_without_traceback(tmp_path, pm):
    result = run_dsk(["recipe", "validate", str(tmp_path / "nope.toml")], pm=pm)
    assert result.exit_code == 2
    assert "recipe file not found" in result.stderr and "nope.toml" in result.stderr


def test_show_resolves_defaults_and_origins(tmp_path, pm):
    write(tmp_path / "base.toml", "[trainer]\ntype = 'toy_trainer'\nsteps = 3\n")
    top = write(tmp_path / "top.toml", "[dsk]\nextends = 'base.toml'\n")
    shown = run_dsk(["recipe", "show", top, "--set", "trainer.lr=0.5"], pm=pm)
    assert shown.exit_code == 0, shown.output
    import tomllib

    data = tomllib.loads(shown.stdout)
    assert (
        data["trainer"] == {"type": "toy_trainer", "steps": 3, "lr": 0.5, "rewards": {}} or data["trainer"]["lr"] == 0.5
    )
    origin = run_dsk(["recipe", "show", top, "--set", "trainer.lr=0.5", "--origin"], pm=pm)
    lines = {line.split(" = ")[0]: line for line in origin.stdout.splitlines()}
    assert "base.toml" in lines["trainer.steps"]
    assert "--set #1" in lines["trainer.lr"]
    assert "default" in lines["checkpoint.keep"]
    as_json = json.loads(run_dsk(["recipe", "show", top, "--origin", "--json"], pm=pm).stdout)
    assert as_json["origins"]["trainer.steps"].endswith("base.toml")


def test_components_list_and_show(pm):
    listed = run_dsk(["components", "router", "--json"], pm=pm)
    names = {c["name"] for c in json.loads(listed.stdout)}
    assert "toy_router" in names
    shown = run_dsk(["components", "show", "ffn/toy_moe"], pm=pm)
    assert shown.exit_code == 0
    assert "n_experts" in shown.stdout and "router slot" in shown.stdout
    detail = json.loads(run_dsk(["components", "show", "router/toy_router", "--json"], pm=pm).stdout)
    top_k = next(o for o in detail["options"] if o["name"] == "top_k")
    assert top_k["default"] == "2" and top_k["description"] == "experts per token"
    unknown = run_dsk(["components", "show", "router/toy_rooter"], pm=pm)
    assert unknown.exit_code == 2 and "did you mean 'toy_router'" in unknown.stderr
    bad_kind = run_dsk(["components", "routr"], pm=pm)
    assert bad_kind.exit_code == 2 and "did you mean 'router'" in bad_kind.stderr


def test_unknown_command_and_option_exit_2(pm):
    assert run_dsk(["plugin"], pm=pm).exit_code == 2
    assert run_dsk(["recipe", "validate", "--bogus", "x.toml"], pm=pm).exit_code == 2


def test_version():
    result = run_dsk(["--version"])
    assert result.exit_code == 0 and "dsk, version" in result.stdout


LIGHT_COMMANDS = [
    ["--help"],
    ["plugins"],
    ["plugins", "--json"],
    ["components"],
    ["components", "show", "attention/mla"],
    ["recipe", "validate", "recipes/base/tiny-dsv3.toml"],
]


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=lambda a: " ".join(a))
def test_light_commands_never_import_torch(args):
    root = Path(__file__).resolve().parents[3]
    code = textwrap.dedent(
        f"""
        import sys
        from dsk.cli import main
        try:
            main({args!r})
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("TORCH_LOADED" if loaded else "NO_TORCH", code, file=sys.stderr)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert "NO_TORCH" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().endswith(" 0"), proc.stderr[-2000:]


def test_absurd_model_sizes_are_recipe_errors_with_their_key_paths():
    """A size no machine could build is refused by the recipe check, with its key path, never at build time by the
    allocator (``model.dim`` was once taken up to 10**30)."""
    from dsk.plugins import make_plugin_manager

    quickstart = str(Path(__file__).resolve().parents[3] / "recipes" / "quickstart.toml")
    sets = ["model.dim=1000000000000000000000000000000", "model.ffn.expert_hidden_dim=10000000000",
            "model.attention.n_heads=100000", "model.n_layers=1000000"]  # fmt: skip
    args = ["recipe", "validate", quickstart]
    for value in sets:
        args += ["--set", value]
    result = run_dsk(args, pm=make_plugin_manager())
    assert result.exit_code == 2
    err = " ".join(result.stderr.split())
    assert "has 4 problems" in err, err
    for value in sets:
        assert value.replace("=", " = ") in err
    assert "less than or equal to 262144" in err and "Traceback" not in result.output
