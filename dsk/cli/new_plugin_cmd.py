"""``dsk new-plugin``: generate a pip-installable plugin package for one component kind."""

from __future__ import annotations

import click

from dsk.api import KINDS
from dsk.cli.common import DskUsageError


@click.command("new-plugin")
@click.argument("name")
@click.option(
    "--kind",
    "kind",
    required=True,
    metavar="KIND",
    help="Component kind: " + ", ".join(KINDS) + ".",
)
@click.option(
    "--dir",
    "directory",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder to create the package folder NAME in.",
)
def new_plugin(name: str, kind: str, directory: str) -> None:
    """Write a complete plugin package NAME for a component of KIND into DIR/NAME.

    The package has a pyproject.toml with the dsk entry point, a torch-free plugin.py that registers the
    component, its pydantic config, a small working implementation to edit, tests that run the kind's
    contract suite, a README and an example recipe. NAME is a distribution name; the import package is NAME
    lowercased with '-' as '_', and the component is registered under that without a leading 'dsk_'.

    \b
    Examples:
      dsk new-plugin dsk-sinkhorn-router --kind router
      dsk new-plugin my-reward --kind reward --dir plugins/
    """
    from dsk.scaffold import ScaffoldError, plan_plugin, write_plugin

    try:
        plan = plan_plugin(name, kind, directory)
        written = write_plugin(plan)
    except ScaffoldError as exc:
        raise DskUsageError(str(exc)) from None
    except OSError as exc:
        raise DskUsageError(f"cannot write {str(plan.target)!r}: {exc.strerror or exc}") from None

    click.echo(f"Wrote {plan.kind} plugin {plan.dist} (component {plan.kind}/{plan.component}):")
    click.echo(_tree(plan.target, [p.relative_to(plan.target) for p in written]))
    target = str(plan.target)
    steps = [
        (f"pip install -e {target}", "or --no-deps, into this environment"),
        (f"pytest {target}/tests", f"the {plan.kind} contract suite"),
        ("dsk plugins", f"lists {plan.component} as loaded"),
        (f"dsk train {target}/recipes/example.toml", "a few steps with it"),
    ]
    width = max(len(cmd) for cmd, _ in steps)
    click.echo("\nNext:")
    for cmd, why in steps:
        click.echo(f"  {cmd.ljust(width)}  # {why}")


def _tree(root, files) -> str:
    """The written files as an indented tree under ``root``."""
    lines = [f"{root}/"]
    seen: set[tuple[str, ...]] = set()
    for rel in sorted(files, key=lambda p: (p.parts[:-1], p.name)):
        for depth in range(1, len(rel.parts)):
            folder = rel.parts[:depth]
            if folder not in seen:
                seen.add(folder)
                lines.append("  " * depth + f"{folder[-1]}/")
        lines.append("  " * len(rel.parts) + rel.name)
    return "\n".join(lines)
