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
from cadence.engine.loop import is_data_error, stored_state_loop
from cadence.errors import CadenceError
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
    quarantined = report["quarantined"]
    if quarantined["count"]:
        aside = Table("event", "subscriber", "set aside", "error", title="events set aside")
        for row in quarantined["recent"]:
            aside.add_row(str(row["event_id"]), row["subscriber"], row["at"], row["error"])
        out.print(aside)
        out.print(
            f"{quarantined['count']:,} set aside in all; `cadence engine retry EVENT` applies one again "
            "once the cause is fixed"
        )


@engine_app.command("catch-up")
def catch_up(
    ctx: typer.Context,
    set_aside: bool = typer.Option(
        False,
        "--set-aside",
        help="When an event cannot be applied, set it aside for the subscribers it fails in and go on "
        "(as `cadence serve` does after repeated failures); `retry` applies it again.",
    ),
) -> None:
    """Apply every event in the log to identity, profiles, consent and attribution (not the learners)."""
    runtime = runtime_for(ctx)
    loop = stored_state_loop(runtime)
    started = time.perf_counter()
    read = 0
    while True:
        try:
            read += loop.catch_up()
            break
        except Exception as exc:  # noqa: BLE001 - said in one line, with what to do
            after = min(loop.positions().values())
            err.print(
                f"error: applying the events after event {after:,} failed: {type(exc).__name__}: {exc}",
                soft_wrap=True,
            )
            if not is_data_error(exc):
                raise typer.Exit(1) from None
            if not set_aside:
                err.print(
                    "`cadence engine catch-up --set-aside` sets the event that fails aside and goes on",
                    soft_wrap=True,
                )
                raise typer.Exit(1) from None
            event_id = loop.set_aside_failing()
            if event_id is None:
                err.print(
                    "the events applied one at a time did not fail: the error is not one event's",
                    soft_wrap=True,
                )
                raise typer.Exit(1) from None
            err.print(f"set event {event_id:,} aside (see `cadence engine status`); going on", soft_wrap=True)
    elapsed = time.perf_counter() - started
    if read:
        out.print(f"applied {read:,} events in {elapsed:.1f} s")
    else:
        out.print("nothing to apply: the log is applied")


@engine_app.command("retry")
def retry(
    ctx: typer.Context, event_id: int = typer.Argument(..., help="The id of an event set aside.")
) -> None:
    """Apply an event the engine loop set aside (see `status`) again, to the subscribers it failed in."""
    runtime = runtime_for(ctx)
    loop = stored_state_loop(runtime)
    try:
        names = loop.retry(event_id)
    except CadenceError as exc:
        err.print(f"error: {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - the subscriber's own error: the event stays set aside
        err.print(f"error: event {event_id} still fails: {type(exc).__name__}: {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    out.print(f"applied event {event_id} to {', '.join(names)}")


def register(app: typer.Typer) -> None:
    """Add ``cadence engine`` to the root app."""
    app.add_typer(engine_app, name="engine")
