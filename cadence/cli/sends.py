"""``cadence sends``: the operator's view of dead letters left in doubt by a crash, and of erased
customers' removals from ad audiences."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import orjson
import typer
from rich.console import Console
from rich.table import Table

from cadence.cli import runtime_for
from cadence.connectors.operator import (
    ActionResult,
    list_failed,
    list_in_doubt,
    list_removals,
    list_sends,
    mark_sent,
    requeue_removals,
    requeue_sends,
)

sends_app = typer.Typer(
    help="The send queue: list sends and why they wait, in-doubt sends, re-queue, mark sent.",
    no_args_is_help=True,
)


def _when(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


@sends_app.command("list")
def list_command(
    ctx: typer.Context,
    status: str | None = typer.Option(
        None, "--status", help="queued, sending, sent, failed, suppressed or expired."
    ),
    campaign: str | None = typer.Option(None, "--campaign", help="Only this campaign's sends."),
    reason: str | None = typer.Option(
        None,
        "--reason",
        help="Only sends whose last error starts with this: quiet: (held by quiet hours), cap:, spacing:, ...",
    ),
    customer: str | None = typer.Option(
        None,
        "--customer",
        help="Only this customer's sends: a user id, an anonymous id or a customer number.",
    ),
    limit: int = typer.Option(100, "--limit", min=1, help="Show at most this many."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List sends, latest change first, with why each is where it is (deferred, dropped, capped, failed)."""
    runtime = runtime_for(ctx)
    rows = list_sends(
        runtime.engine, status=status, campaign=campaign, reason=reason, customer=customer, limit=limit
    )
    if as_json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if not rows:
        console.print("no sends")
        return
    table = Table("id", "campaign", "customer", "channel", "status", "due (UTC)", "attempts", "why")
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["campaign"],
            str(row["customer_id"]),
            row["channel"],
            row["status"],
            _when(row["due_ms"]),
            str(row["attempts"]),
            row["last_error"] or "",
        )
    console.print(table)


console = Console()
err_console = Console(stderr=True)


@sends_app.command("in-doubt")
def in_doubt(
    ctx: typer.Context,
    limit: int = typer.Option(100, "--limit", min=1, help="Show at most this many."),
    campaign: str | None = typer.Option(None, "--campaign", help="Only this campaign's sends."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List sends dead-lettered as in doubt: claimed, then the dispatcher died mid-delivery."""
    runtime = runtime_for(ctx)
    rows = list_in_doubt(runtime.engine, limit=limit, campaign=campaign)
    if as_json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if not rows:
        console.print("no in-doubt sends")
        return
    table = Table("id", "campaign", "customer", "channel", "connector", "key", "since (UTC)")
    for row in rows:
        since = datetime.fromtimestamp(row["updated_ms"] / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            str(row["id"]),
            row["campaign"],
            str(row["customer_id"]),
            row["channel"],
            row["connector"] or "-",
            row["idempotency_key"],
            since,
        )
    console.print(table)
    console.print(
        "Check each with the provider, then `cadence sends requeue ID...` to send it, "
        "or `cadence sends mark-sent ID...` if the provider has it."
    )


def _report(result: ActionResult, verb: str, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(result.as_dict()).decode() + "\n")
    else:
        console.print(
            f"{verb}: {len(result.done)}" + (f" ({', '.join(map(str, result.done))})" if result.done else "")
        )
        for send_id, reason in result.refused.items():
            err_console.print(f"send {send_id}: {reason}", highlight=False)
    if result.refused:
        raise typer.Exit(1)


@sends_app.command("requeue")
def requeue(
    ctx: typer.Context,
    ids: list[int] = typer.Argument(None, help="Send ids (from `cadence sends in-doubt`)."),
    all_in_doubt: bool = typer.Option(False, "--all-in-doubt", help="Re-queue every in-doubt send."),
    failed_with: str | None = typer.Option(
        None,
        "--failed-with",
        help="Re-queue every dead letter whose error starts with this (e.g. ConfigError, AuthenticationFailure).",
    ),
    campaign: str | None = typer.Option(
        None, "--campaign", help="With --all-in-doubt or --failed-with: only this campaign."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Put dead-lettered sends back on the queue (due now, attempts reset). Exits 1 if any was refused."""
    runtime = runtime_for(ctx)
    chosen = list(ids or [])
    if all_in_doubt:
        chosen += [row["id"] for row in list_in_doubt(runtime.engine, limit=1_000_000, campaign=campaign)]
    if failed_with:
        rows = list_failed(runtime.engine, error_prefix=failed_with, limit=1_000_000, campaign=campaign)
        chosen += [row["id"] for row in rows if row["id"] not in chosen]
    if not chosen:
        if all_in_doubt or failed_with:  # nothing matched: nothing to do, not a mistake
            _report(ActionResult(), "re-queued", as_json)
            return
        raise typer.BadParameter("give send ids, --all-in-doubt or --failed-with")
    _report(requeue_sends(runtime.engine, ids=chosen, now_ms=runtime.clock.now_ms()), "re-queued", as_json)


@sends_app.command("mark-sent")
def mark_sent_command(
    ctx: typer.Context,
    ids: list[int] = typer.Argument(..., help="In-doubt send ids the provider turned out to have."),
    provider_message_id: str | None = typer.Option(None, "--provider-id", help="The provider's message id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Record in-doubt sends as sent (nothing is sent again). Exits 1 if any was refused."""
    runtime = runtime_for(ctx)
    result = mark_sent(
        runtime.engine, ids=ids, now_ms=runtime.clock.now_ms(), provider_message_id=provider_message_id
    )
    _report(result, "marked sent", as_json)


@sends_app.command("removals")
def removals_command(
    ctx: typer.Context,
    status: str | None = typer.Option(None, "--status", help="queued, sending or failed."),
    limit: int = typer.Option(100, "--limit", min=1, help="Show at most this many."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List erased customers' removals from ad audiences not yet accepted by the platform (no hashes shown)."""
    runtime = runtime_for(ctx)
    rows = list_removals(runtime.engine, status=status, limit=limit)
    if as_json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if not rows:
        console.print("no pending audience removals")
        return
    table = Table("id", "erasure", "campaign", "connector", "audience", "status", "attempts", "why")
    for row in rows:
        variables = row["variables"] or {}
        table.add_row(
            str(row["id"]),
            str(row["erasure_id"]),
            row["campaign"],
            row["connector"],
            str(variables.get("audience_id") or variables.get("user_list") or "-"),
            row["status"],
            str(row["attempts"]),
            row["last_error"] or "",
        )
    console.print(table)


@sends_app.command("requeue-removals")
def requeue_removals_command(
    ctx: typer.Context,
    ids: list[int] = typer.Argument(None, help="Removal ids (from `cadence sends removals`)."),
    all_failed: bool = typer.Option(False, "--all-failed", help="Re-queue every failed removal."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Put dead-lettered audience removals back on the queue. Exits 1 if any was refused."""
    runtime = runtime_for(ctx)
    chosen = list(ids or [])
    if all_failed:
        failed = list_removals(runtime.engine, status="failed", limit=1_000_000)
        chosen += [row["id"] for row in failed if row["id"] not in chosen]
    if not chosen:
        if all_failed:
            _report(ActionResult(), "re-queued", as_json)
            return
        raise typer.BadParameter("give removal ids or --all-failed")
    _report(requeue_removals(runtime.engine, ids=chosen, now_ms=runtime.clock.now_ms()), "re-queued", as_json)


def register(app: typer.Typer) -> None:
    """Add ``cadence sends`` to the root app."""
    app.add_typer(sends_app, name="sends")
