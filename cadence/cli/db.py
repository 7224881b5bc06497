"""``cadence db``: schema migrations and compaction of derived state."""

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


@db_app.command("compact")
def compact(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be deleted; delete nothing."),
) -> None:
    """Delete derived state no rule, model or query can use any more (never the event log,
    unless CADENCE_EVENT_RETENTION_DAYS asks for it)."""
    from rich.table import Table

    from cadence.cli import runtime_for
    from cadence.dsl.explain import installed_channels
    from cadence.dsl.loader import RulesetHolder
    from cadence.scheduler.compaction import compact_derived_state
    from cadence.scheduler.needs import needs_of_holder

    runtime = runtime_for(ctx)
    settings = runtime.settings
    holder = RulesetHolder(
        list(settings.rules_paths),
        available_channels=installed_channels(settings),
        default_zone=settings.default_timezone,
    )
    report = compact_derived_state(
        engine=runtime.engine,
        clock=runtime.clock,
        settings=settings,
        needs=needs_of_holder(holder),
        dry_run=dry_run,
    )
    table = Table("table", "would delete" if dry_run else "deleted")
    for name, count in report.deleted.items():
        table.add_row(name, f"{count:,}")
    console.print(table)
    for note in report.notes:
        console.print(f"  {note}")
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {report.total:,} rows in {report.seconds:.1f}s")


def register(app: typer.Typer) -> None:
    """Add ``cadence db`` to the root app."""
    app.add_typer(db_app, name="db")
