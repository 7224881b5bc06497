"""``cadence keys``: API keys with scopes."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from cadence.cli import runtime_for
from cadence.clock import ms_to_datetime
from cadence.keys import create_key, revoke_key
from cadence.settings import SCOPES
from cadence.store.db import read_connection
from cadence.store.schema.core import api_keys

keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
console = Console()


@keys_app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="A name to recognise the key by."),
    scope: list[str] = typer.Option(["ingest"], "--scope", help=f"Repeatable: {', '.join(SCOPES)}."),
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    runtime = runtime_for(ctx, upgrade=True)
    try:
        key = create_key(runtime.engine, name=name, scopes=scope)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--scope") from exc
    console.print(key)


@keys_app.command("list")
def list_keys(ctx: typer.Context) -> None:
    """List stored keys (names, scopes, dates; never the keys)."""
    runtime = runtime_for(ctx)
    table = Table("name", "scopes", "created", "revoked")
    with read_connection(runtime.engine) as conn:
        for row in conn.execute(select(api_keys).order_by(api_keys.c.id)):
            revoked = ms_to_datetime(row.revoked_ms).isoformat() if row.revoked_ms else ""
            table.add_row(row.name, row.scopes, ms_to_datetime(row.created_ms).isoformat(), revoked)
    console.print(table)


@keys_app.command("revoke")
def revoke(ctx: typer.Context, name: str = typer.Argument(...)) -> None:
    """Revoke every active key with this name."""
    runtime = runtime_for(ctx)
    count = revoke_key(runtime.engine, name=name)
    if not count:
        console.print(f"no active key named {name!r}")
        raise typer.Exit(1)
    console.print(f"revoked {count} key(s)")


def register(app: typer.Typer) -> None:
    """Add ``cadence keys`` to the root app."""
    app.add_typer(keys_app, name="keys")
