"""``cadence jobs``: the scheduled campaigns with their next run and last run."""

from __future__ import annotations

import sys

import orjson
import typer
from rich.console import Console
from rich.table import Table

from cadence.cli import runtime_for
from cadence.clock import now_ms
from cadence.dsl.explain import installed_channels
from cadence.dsl.loader import load_rules
from cadence.scheduler.service import list_jobs

console = Console()


def jobs(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List scheduled campaigns (from the rule files) with their next run and their last run."""
    runtime = runtime_for(ctx)
    settings = runtime.settings
    result = load_rules(
        settings.rules_paths,
        available_channels=installed_channels(settings),
        default_zone=settings.default_timezone,
    )
    ruleset = result.raise_for_errors()
    rows = list_jobs(runtime.engine, ruleset, now_ms=now_ms())
    if as_json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if not rows:
        console.print("no scheduled campaigns")
        return
    table = Table("campaign", "schedule", "next run (UTC)", "last run", "status", "queued")
    for row in rows:
        last = row["last_run"] or {}
        table.add_row(
            row["campaign"] + (" (removed)" if row["removed"] else ""),
            row["schedule"] or "",
            row["next_run"] or "-",
            last.get("occurrence") or "-",
            last.get("status") or "-",
            str(last.get("enqueued", "")),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``cadence jobs`` to the root app."""
    app.command("jobs")(jobs)
