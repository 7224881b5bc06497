"""``cadence plugins``: what plugins and connectors this installation has."""

from __future__ import annotations

from typing import Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from cadence.cli import settings_from_cli
from cadence.plugins.manager import build_connectors, make_plugin_manager

plugins_app = typer.Typer(help="Plugins and the connectors they provide.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


@plugins_app.command("list")
def list_plugins(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """List loaded plugins (with load errors) and the connectors they provide.

    Exits 1 when a plugin failed to load, so scripts and CI notice.
    """
    settings = settings_from_cli(ctx)
    pm = make_plugin_manager(settings)
    registry = build_connectors(settings, pm=pm)
    connectors: list[dict[str, Any]] = [
        {
            "name": c.name,
            "channels": sorted(c.channels),
            "enabled": c.name == "outbox" or c.name in registry.enabled,
            "max_batch_size": c.capabilities.max_batch_size,
            "rate_limit_per_second": c.capabilities.rate_limit_per_second,
            "scheduling": c.capabilities.supports_scheduling,
            "required_fields": list(c.capabilities.required_fields),
            "consent_required": c.capabilities.consent_required,
            # Only a connector that would be used is checked: an unconfigured one is not chosen.
            "missing_settings": c.missing_settings() if c.name in registry.enabled else [],
        }
        for c in registry.connectors.values()
    ]
    failed = [info for info in pm.infos if info.error]
    incomplete = [c for c in connectors if c["missing_settings"]]
    if as_json:
        payload = {"plugins": [i.as_dict() for i in pm.infos], "connectors": connectors}
        typer.echo(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())
    else:
        table = Table(title="plugins")
        for column in ("name", "source", "module", "version", "hooks", "error"):
            table.add_column(column)
        for info in pm.infos:
            table.add_row(
                info.name,
                info.source,
                info.module,
                info.version or "",
                ", ".join(h.removeprefix("cadence_") for h in info.hooks),
                f"[red]{info.error}[/]" if info.error else "",
            )
        console.print(table)
        ctable = Table(title="connectors")
        for column in ("name", "channels", "enabled", "batch", "rate/s", "scheduling", "needs", "opt-in"):
            ctable.add_column(column)
        for c in connectors:
            ctable.add_row(
                str(c["name"]),
                ", ".join(c["channels"]),
                (
                    f"[red]yes, but missing {', '.join(c['missing_settings'])}[/]"
                    if c["missing_settings"]
                    else "yes"
                    if c["enabled"]
                    else "no (not configured)"
                ),
                str(c["max_batch_size"]),
                str(c["rate_limit_per_second"] or "-"),
                "yes" if c["scheduling"] else "no",
                ", ".join(c["required_fields"]) or "-",
                "yes" if c["consent_required"] else "no",
            )
        console.print(ctable)
    for info in failed:
        err_console.print(
            f"[bold red]plugin {info.name} ({info.module}) failed:[/] {info.error}", highlight=False
        )
    for c in incomplete:
        err_console.print(
            f"[bold red]connector {c['name']} is configured but cannot send without:[/] "
            f"{', '.join(c['missing_settings'])}",
            highlight=False,
        )
    if failed or incomplete:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``cadence plugins`` to the root app."""
    app.add_typer(plugins_app, name="plugins")
