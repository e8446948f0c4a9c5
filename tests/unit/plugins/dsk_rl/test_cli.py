"""``dsk distill`` belongs to the rl plugin: added through ``register_commands``, never named by the core CLI."""

import subprocess
import sys
import textwrap
from pathlib import Path

from dsk.testing import isolated_plugin_manager, run_dsk

ROOT = Path(__file__).resolve().parents[4]


def test_the_core_cli_names_no_distill():
    named = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "dsk" / "cli").rglob("*.py"))
             if "distill" in p.read_text(encoding="utf-8").lower()]  # fmt: skip
    assert named == [], f"the core CLI names distill in {named}"


def test_distill_is_listed_and_runs_only_with_the_rl_plugin(monkeypatch):
    listing = run_dsk(["--help"], pm=isolated_plugin_manager())
    assert listing.exit_code == 0 and "distill" in listing.stdout
    assert "Teacher -> reasoning traces -> student." in listing.stdout
    monkeypatch.setenv("DSK_DISABLE_PLUGINS", "rl")
    without = isolated_plugin_manager()
    assert "distill" not in run_dsk(["--help"], pm=without).stdout
    missing = run_dsk(["distill", "recipe.toml"], pm=without)
    assert missing.exit_code == 2 and "No such command 'distill'" in missing.stderr


def test_help_of_dsk_and_of_distill_imports_no_torch():
    code = textwrap.dedent(
        """
        import sys
        import dsk.api.cli
        from dsk.cli import main
        codes = []
        for args in (["--help"], ["distill", "--help"]):
            try:
                main(args)
            except SystemExit as exc:
                codes.append(exc.code)
        print("RESULT", codes, "dsk_rl.cli" in sys.modules, any(m.split(".")[0] == "torch" for m in sys.modules),
              file=sys.stderr)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "RESULT [0, 0] True False" in proc.stderr, proc.stderr[-2000:]
    assert "--teacher CKPT" in proc.stdout
