"""``cadence models``: list learner snapshots with their recent quality, pin, roll back, unpin."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine

from cadence.cli import settings_from_cli
from cadence.store.db import create_db_engine, read_connection

models_app = typer.Typer(help="Learner snapshots: list, pin, roll back.", no_args_is_help=True)
console = Console()

# ``LearnerSubscriber.name``; spelled out so the CLI starts without importing river
# (tests/engine/test_learning.py checks they agree).
NAME = "learners"


def _engine(ctx: typer.Context) -> Engine:
    engine = create_db_engine(settings_from_cli(ctx).database_url)
    ctx.call_on_close(engine.dispose)
    return engine


def _measure(value: float | None, digits: int) -> str:
    """A quality measure, or ``-`` where it is not defined yet (stored as null).

    An AUC needs a positive and a negative label in its window: with no click (or no unsubscribe)
    among the recent labels it has no value, and 0.000 would read as a perfectly wrong model.

    >>> _measure(0.61234, 3), _measure(None, 3)
    ('0.612', '-')
    """
    return "-" if value is None else f"{value:.{digits}f}"


@models_app.command("list")
def list_models(ctx: typer.Context, name: str = typer.Option(NAME, "--name", help="Learner name.")) -> None:
    """Every snapshot, newest first, with the log position, labels and recent quality."""
    from cadence.engine.learning import list_snapshots

    engine = _engine(ctx)
    with read_connection(engine) as conn:
        snaps = list_snapshots(conn, name=name)
    if not snaps:
        console.print(f"no snapshots of learner {name!r} yet")
        return
    table = Table(title=f"learner {name!r}")
    for col in (
        "version",
        "pinned",
        "created (UTC)",
        "log position",
        "labels",
        "engagement AUC",
        "log loss",
        "unsub AUC",
        "size",
    ):
        table.add_column(col, justify="right")
    for s in snaps:
        q = s.quality
        table.add_row(
            str(s.version),
            "yes" if s.pinned else "",
            datetime.fromtimestamp(s.created_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M"),
            str(s.position),
            f"{s.labels:,}",
            _measure(q.get("engagement_auc"), 3),
            _measure(q.get("engagement_logloss"), 4),
            _measure(q.get("unsubscribe_auc"), 3),
            f"{s.size_bytes / 1024:.0f} KiB",
        )
    console.print(table)


@models_app.command("pin")
def pin(
    ctx: typer.Context,
    version: int = typer.Argument(..., help="Snapshot version to serve."),
    name: str = typer.Option(NAME, "--name", help="Learner name."),
) -> None:
    """Serve this snapshot, frozen, until `cadence models unpin` (the live learner keeps learning)."""
    from cadence.engine.learning import pin_snapshot

    engine = _engine(ctx)
    with engine.begin() as conn:
        pin_snapshot(conn, name=name, version=version)
    console.print(f"learner {name!r} pinned to version {version}")


@models_app.command("rollback")
def rollback(
    ctx: typer.Context,
    version: int = typer.Argument(..., help="An earlier snapshot version to go back to."),
    name: str = typer.Option(NAME, "--name", help="Learner name."),
) -> None:
    """Go back to an earlier snapshot (pins it); `unpin` returns to the live learner."""
    from cadence.engine.learning import pin_snapshot

    engine = _engine(ctx)
    with engine.begin() as conn:
        pin_snapshot(conn, name=name, version=version)
    console.print(f"learner {name!r} rolled back to version {version} (pinned)")


@models_app.command("unpin")
def unpin_model(ctx: typer.Context, name: str = typer.Option(NAME, "--name", help="Learner name.")) -> None:
    """Serve the live learner again."""
    from cadence.engine.learning import unpin

    engine = _engine(ctx)
    with engine.begin() as conn:
        unpin(conn, name=name)
    console.print(f"learner {name!r} unpinned: serving the live learner")
