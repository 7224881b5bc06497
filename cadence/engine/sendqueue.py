"""Putting sends on the queue, idempotently. Taking them off is the dispatcher's job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from cadence.store.schema.sends import sends

__all__ = ["enqueue_send", "enqueue_sends", "idempotency_key"]


def idempotency_key(campaign: str, customer_id: int, occurrence: str) -> str:
    """The key that makes a send unique: campaign, customer and occurrence.

    The occurrence names which firing this is: the scheduled run's date, the
    triggering event's id, or the decision id for a one-off API decision.

    >>> idempotency_key("winback", 42, "2026-03-05")
    'winback:42:2026-03-05'
    """
    return f"{campaign}:{customer_id}:{occurrence}"


def enqueue_send(
    conn: Connection,
    *,
    key: str,
    campaign: str,
    customer_id: int,
    channel: str,
    due_ms: int,
    now_ms: int,
    template: str | None = None,
    variables: dict[str, Any] | None = None,
    decision_id: str | None = None,
    connector: str | None = None,
) -> bool:
    """Queue a send inside the caller's transaction; False if ``key`` was already queued."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    result = conn.execute(
        insert(sends)
        .values(
            idempotency_key=key,
            decision_id=decision_id,
            campaign=campaign,
            customer_id=customer_id,
            channel=channel,
            connector=connector,
            template=template,
            variables=variables or {},
            due_ms=due_ms,
            status="queued",
            attempts=0,
            created_ms=now_ms,
            updated_ms=now_ms,
        )
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
    )
    return bool(result.rowcount)


def enqueue_sends(conn: Connection, rows: Sequence[Mapping[str, Any]], *, now_ms: int) -> int:
    """Queue many sends in one statement (audience pushes); returns how many were new.

    Each row has the keyword arguments of :func:`enqueue_send` but ``now_ms``
    (``key``, ``campaign``, ``customer_id``, ``channel``, ``due_ms``, optional
    ``template``, ``variables``, ``decision_id``, ``connector``). A key already
    queued is skipped, exactly as with :func:`enqueue_send`.
    """
    if not rows:
        return 0
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    values = [
        {
            "idempotency_key": row["key"],
            "decision_id": row.get("decision_id"),
            "campaign": row["campaign"],
            "customer_id": row["customer_id"],
            "channel": row["channel"],
            "connector": row.get("connector"),
            "template": row.get("template"),
            "variables": row.get("variables") or {},
            "due_ms": row["due_ms"],
            "status": "queued",
            "attempts": 0,
            "created_ms": now_ms,
            "updated_ms": now_ms,
        }
        for row in rows
    ]
    stmt = insert(sends).on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(sends.c.id)
    return len(conn.execute(stmt, values).all())
