"""``cadence customers``: privacy export and erasure."""

from __future__ import annotations

import sys

import orjson
import typer
from rich.console import Console

from cadence.cli import runtime_for
from cadence.cli.engine import apply_pending
from cadence.engine.learning import scrub_snapshots
from cadence.engine.privacy import erase_customer, export_customer

customers_app = typer.Typer(help="Customer data requests.", no_args_is_help=True)
console = Console(stderr=True)


@customers_app.command("export")
def export(ctx: typer.Context, ref: str = typer.Argument(..., help="A user id or anonymous id.")) -> None:
    """Print everything held about a customer as JSON."""
    runtime = runtime_for(ctx)
    apply_pending(runtime)  # the export reads identities and profiles the log may not have reached yet
    data = export_customer(engine=runtime.engine, ref=ref)
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


@customers_app.command("erase")
def erase(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="A user id or anonymous id."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    operator: str = typer.Option("cli", help="Who asked (recorded; never the customer's ids)."),
) -> None:
    """Erase a customer's events, identities and traits and correct every derived state."""
    if not yes:
        typer.confirm(f"Erase everything about {ref!r}? This cannot be undone", abort=True)
    runtime = runtime_for(ctx)
    apply_pending(runtime)  # every identity the log links to the customer, and their derived state
    counts = erase_customer(runtime=runtime, ref=ref, requested_by=f"cli:{operator}")
    console.print(f"erased: {counts['events_removed']} events, {counts['identities_removed']} identities")
    # No server may be running to do it: the stored learner snapshots forget the customer now.
    _customers, rewritten = scrub_snapshots(runtime.engine)
    console.print(f"{rewritten} learner snapshots rewritten without the customer")
    console.print(
        f"{counts['audience_removals_queued']} removals from remote ad audiences queued"
        " (listed by `cadence sends removals` until the platforms accept them)",
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add ``cadence customers`` to the root app."""
    app.add_typer(customers_app, name="customers")
