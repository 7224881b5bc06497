"""``cadence engine``: how far the event log is applied to derived state, and applying the rest.

``cadence serve`` applies the log continuously. Without a server running, events written by
``cadence import`` (or by a server that stopped) wait in the log: ``catch-up`` applies them to
the state kept in the database (identity, profiles, consent, attribution), and the commands
that read that state (``cadence explain``, ``cadence customers``) apply them first themselves
(:func:`apply_pending`). The learners, whose state lives in a serving process, catch up from
their snapshot when a server starts (``cadence models`` lists the snapshots).
"""

from __future__ import annotations

import sys
import time

import orjson
import typer
from rich.console import Console
from rich.table import Table

from cadence.cli import runtime_for
from cadence.engine.loop import stored_state_loop
from cadence.runtime import Runtime

engine_app = typer.Typer(help="The event log's state: how far it is applied, and applying the rest.")
out = Console()
err = Console(stderr=True)


def apply_pending(runtime: Runtime, *, quiet: bool = False) -> int:
    """Apply every event not applied yet to the database-backed state; return how many were read.

    Says on stderr how many it applies (unless ``quiet``), as after a large import this takes a while.
    """
    loop = stored_state_loop(runtime)
    behind = loop.lag()
    if not behind:
        return 0
    if not quiet:
        err.print(f"applying {behind:,} events not applied yet (no `cadence serve` running?)")
    return loop.catch_up()


@engine_app.command("status")
def status(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")
) -> None:
    """Each subscriber's position in the event log and how many events are not applied yet."""
    loop = stored_state_loop(runtime_for(ctx))
    report = loop.status()
    for key in ("running", "leader", "failing"):  # a server's own (GET /v1/engine); none run here
        report.pop(key, None)
    if as_json:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
        return
    table = Table("subscriber", "position")
    for name, position in sorted(report["positions"].items()):
        table.add_row(name, f"{position:,}")
    out.print(table)
    out.print(f"{report['lag']:,} events not applied yet")


@engine_app.command("catch-up")
def catch_up(ctx: typer.Context) -> None:
    """Apply every event in the log to identity, profiles, consent and attribution (not the learners)."""
    runtime = runtime_for(ctx)
    started = time.perf_counter()
    read = apply_pending(runtime, quiet=True)
    elapsed = time.perf_counter() - started
    if read:
        out.print(f"applied {read:,} events in {elapsed:.1f} s")
    else:
        out.print("nothing to apply: the log is applied")


def register(app: typer.Typer) -> None:
    """Add ``cadence engine`` to the root app."""
    app.add_typer(engine_app, name="engine")
