"""``cadence db``: schema migrations."""

from __future__ import annotations

import typer
from rich.console import Console

from cadence.cli import settings_from_cli
from cadence.store.db import create_db_engine, migrate, pending_migrations

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
console = Console()


@db_app.command("upgrade")
def upgrade(ctx: typer.Context) -> None:
    """Apply every pending migration to the configured database."""
    settings = settings_from_cli(ctx)
    engine = create_db_engine(settings.database_url)
    ctx.call_on_close(engine.dispose)
    migrate(engine)
    console.print(f"database at [bold]{engine.url.render_as_string()}[/] is up to date")


@db_app.command("status")
def status(ctx: typer.Context) -> None:
    """Show whether migrations are pending (exit 1 if they are)."""
    settings = settings_from_cli(ctx)
    engine = create_db_engine(settings.database_url)
    ctx.call_on_close(engine.dispose)
    pending = pending_migrations(engine)
    if pending:
        console.print(f"pending migrations: {', '.join(sorted(pending))}")
        raise typer.Exit(1)
    console.print("up to date")


def register(app: typer.Typer) -> None:
    """Add ``cadence db`` to the root app."""
    app.add_typer(db_app, name="db")
