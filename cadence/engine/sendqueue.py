"""Putting sends on the queue, idempotently. Taking them off is the dispatcher's job."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from cadence.store.schema.sends import sends

__all__ = ["enqueue_send", "idempotency_key"]


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
