"""``cadence import``: load events from NDJSON or CSV files."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from cadence.cli import runtime_for, settings_from_cli
from cadence.engine.importer import DEFAULT_BATCH_SIZE, import_file, parse_mapping
from cadence.store.driver import driver_target

console = Console()


def import_command(
    ctx: typer.Context,
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="An .ndjson/.jsonl or .csv file."),
    fmt: str | None = typer.Option(None, "--format", help="csv or ndjson (default: from the extension)."),
    mapping: list[str] = typer.Option(
        [],
        "--map",
        help="CSV column to Segment field, e.g. --map user=userId --map amount=properties.revenue.",
    ),
    default_type: str = typer.Option("track", "--type", help="Call type for lines without one."),
    rejects: Path | None = typer.Option(None, help="Where rejected lines go (default FILE.rejects.ndjson)."),
    warnings: Path | None = typer.Option(
        None,
        help="Where the warnings on stored lines go, each with its line and field (default FILE.warnings.ndjson).",
    ),
    batch_size: int = typer.Option(
        DEFAULT_BATCH_SIZE, min=1, help="Lines per committed batch (one transaction)."
    ),
) -> None:
    """Import Segment-spec events; bad lines are reported and skipped, never fatal.

    Fields of stored lines that cadence cannot use as sent are reported as ``POST /v1/batch``
    warns of them: the first ones with their line and field, every one in the warnings file.
    """
    # A current database is written through its driver alone (no SQLAlchemy to load: a shorter
    # start-up); any other goes through the runtime, which migrates it first and says what is wrong.
    target = driver_target(settings_from_cli(ctx).database_url) or runtime_for(ctx, upgrade=True).engine
    try:
        column_map = parse_mapping(mapping)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--map") from exc
    size = path.stat().st_size
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(f"importing {path.name}", total=size)
        try:
            report = import_file(
                engine=target,
                path=path,
                fmt=fmt,
                mapping=column_map,
                default_type=default_type,
                rejects_path=rejects,
                warnings_path=warnings,
                batch_size=batch_size,
                progress=lambda done: progress.update(task, completed=done),
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    table = Table(title=f"import of {path}")
    for column in ("lines", "accepted", "duplicates", "rejected"):
        table.add_column(column, justify="right")
    table.add_row(str(report.lines), str(report.accepted), str(report.duplicates), str(report.rejected))
    console.print(table)
    if report.rejected:
        reasons = ", ".join(f"{field}: {n}" for field, n in sorted(report.reasons.items()))
        console.print(
            f"[yellow]{report.rejected} rejected line(s) ({reasons}) written to {report.rejects_path}[/]"
        )
    if report.warned:
        for shown in report.first_warnings:
            console.print(
                f"line {shown.line}: {shown.field}: {shown.warning}", highlight=False, soft_wrap=True
            )
        fields = ", ".join(f"{field}: {n}" for field, n in sorted(report.warning_fields.items()))
        more = report.warned - len(report.first_warnings)
        console.print(
            f"[yellow]{report.warned} warning(s) on stored lines ({fields})"
            + (f", {more} not shown above," if more else "")
            + f" written to {report.warnings_path}[/]",
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    """Add ``cadence import`` to the root app."""
    app.command("import")(import_command)
