"""``dsk plugins`` and ``dsk components``: what is loaded, what it provides, and each component's options."""

from __future__ import annotations

from typing import Any

import click

from dsk.api import KINDS, slot_kind
from dsk.cli.common import DskUsageError, echo_json, escape, stdout_console


def _provides(registry: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in registry.all():
        out.setdefault(spec.provider, []).append(f"{spec.kind}/{spec.name}")
    return out


def _warnings(registry: Any) -> dict[str, list[str]]:
    """Per provider, what is wrong with its registrations (components of dsk's own distribution are tested)."""
    from dsk.registry import spec_warnings

    out: dict[str, list[str]] = {}
    for spec in registry.all():
        if spec.distribution != "dsk":
            out.setdefault(spec.provider, []).extend(spec_warnings(spec))
    return {k: v for k, v in out.items() if v}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one object per plugin.")
@click.option("--all", "show_all", is_flag=True, help="Also list blocked plugins.")
@click.pass_obj
def plugins(app: Any, as_json: bool, show_all: bool) -> None:
    """List plugins: name, version, what each provides, status and error.

    \b
    DSK_LOAD_PLUGINS=a,b   load only these plugins (or distributions)
    DSK_DISABLE_PLUGINS=x  never load x
    dsk --plugin my_router.py plugins   add a local plugin for one invocation
    """
    pm = app.plugin_manager()
    registry = app.registry()
    provides = _provides(registry)
    warnings = _warnings(registry)
    infos = [i for i in pm.infos.values() if show_all or i.status != "blocked"]
    infos.sort(key=lambda i: (i.status != "loaded", i.name))
    conflicts = registry.conflicts()
    if as_json:
        rows = []
        for info in infos:
            row = info.to_json(pm)
            row["provides"] = provides.get(info.name, [])
            row["warnings"] = warnings.get(info.name, [])
            rows.append(row)
        echo_json({"plugins": rows, "conflicts": [{"kind": k, "name": n, "providers": p} for k, n, p in conflicts]})
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "VERSION", "STATUS", "PROVIDES / ERROR"):
        table.add_column(col)
    for info in infos:
        if info.status == "loaded":
            detail = ", ".join(provides.get(info.name, [])) or "-"
            status = "[green]loaded[/]"
            if info.name in warnings:
                status += (
                    f" [yellow]({len(warnings[info.name])} warning{'s' if len(warnings[info.name]) > 1 else ''})[/]"
                )
        elif info.status == "failed":
            detail = f"[red]{escape(info.error or '')}[/]"
            status = "[red]failed[/]"
        elif info.status == "incompatible":
            detail = f"[yellow]{escape(info.error or '')}[/]"
            status = "[yellow]incompatible[/]"
        else:
            detail, status = "-", "[dim]blocked[/]"
        table.add_row(escape(info.name), info.version or "-", status, detail)
    console = stdout_console()
    if not infos:
        console.print("no plugins loaded (DSK_LOAD_PLUGINS may be empty)")
    else:
        console.print(table)
    failed = pm.failures()
    if failed:
        console.print(
            f"\n{len(failed)} plugin(s) failed to load; DSK_STRICT_PLUGINS=1 re-raises the error, "
            "DSK_DISABLE_PLUGINS=NAME silences it."
        )
    for name, lines in warnings.items():
        for line in lines:
            console.print(f"[yellow]warning:[/] {escape(name)}: {escape(line)}")
    for kind, name, providers in conflicts:
        console.print(
            f"[yellow]conflict:[/] {kind} '{name}' is provided by {', '.join(providers)}; "
            f'recipes must write type = "PROVIDER:{name}"'
        )


def _type_text(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def options_rows(config: Any) -> list[dict[str, Any]]:
    """Name, type, default and description of every option of a config model."""
    rows = []
    for name, info in config.model_fields.items():
        marker = slot_kind(info)
        if marker is not None:
            kind, default, is_map = marker
            type_text = f"table of {kind} slots" if is_map else f"{kind} slot"
            default_text = (
                "{}"
                if is_map
                else (f'{{type = "{default}"}}' if default else ("required" if info.is_required() else "none"))
            )
        else:
            type_text = _type_text(info.annotation)
            if info.is_required():
                default_text = "required"
            elif info.default_factory is not None:
                default_text = repr(info.default_factory())
            else:
                default_text = repr(info.default)
        rows.append(
            {
                "name": info.alias or name,
                "type": type_text,
                "default": default_text,
                "description": info.description or "",
            }
        )
    return rows


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("args", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def components(app: Any, args: tuple[str, ...], as_json: bool) -> None:
    """List registered components, or show one's options.

    \b
    dsk components                 every component, by kind
    dsk components router          one kind
    dsk components show router/noaux_tc
    """
    registry = app.registry()
    if args and args[0] == "show":
        if len(args) != 2 or "/" not in args[1]:
            raise DskUsageError("usage: dsk components show KIND/NAME (for example router/noaux_tc)")
        _show(registry, args[1], as_json)
        return
    if len(args) > 1:
        raise DskUsageError("usage: dsk components [KIND] | dsk components show KIND/NAME")
    kind = args[0] if args else None
    if kind is not None and kind not in KINDS and kind not in registry.kinds():
        from dsk.registry import did_you_mean

        close = did_you_mean(kind, list(KINDS))
        hint = f"; did you mean '{close[0]}'?" if close else f"; kinds: {', '.join(KINDS)}"
        raise DskUsageError(f"unknown component kind '{kind}'{hint}")
    specs = list(registry.all(kind))
    if as_json:
        echo_json(
            [
                {
                    "kind": s.kind,
                    "name": s.name,
                    "provider": s.provider,
                    "version": s.version,
                    "summary": s.summary,
                    "impl": s.impl_path,
                    "aliases": list(s.aliases),
                }
                for s in specs
            ]
        )
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("KIND/NAME", "PROVIDER", "SUMMARY"):
        table.add_column(col)
    for s in specs:
        table.add_row(f"{s.kind}/{s.name}", escape(s.provider), escape(s.summary))
    stdout_console().print(table if specs else f"no {kind or ''} components registered".replace("  ", " "))


def _show(registry: Any, target: str, as_json: bool) -> None:
    from dsk.registry import LookupFailed

    kind, _, name = target.partition("/")
    try:
        spec = registry.get(kind, name)
    except LookupFailed as exc:
        raise DskUsageError(exc.message + (f"; {exc.hint}" if exc.hint else "")) from None
    rows = options_rows(spec.config)
    if as_json:
        echo_json(
            {
                "kind": spec.kind,
                "name": spec.name,
                "provider": spec.provider,
                "version": spec.version,
                "summary": spec.summary,
                "impl": spec.impl_path,
                "options": rows,
            }
        )
        return
    from rich.table import Table

    console = stdout_console()
    console.print(f"[bold]{spec.kind}/{spec.name}[/]  ({escape(spec.provider)} {spec.version or ''})")
    if spec.summary:
        console.print(escape(spec.summary))
    if not rows:
        console.print("\nno options")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("OPTION", "TYPE", "DEFAULT", "DESCRIPTION"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], escape(r["type"]), escape(r["default"]), escape(r["description"]))
    console.print(table)
