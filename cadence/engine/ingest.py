"""Appending to the event log: dedupe by ``messageId``, commit, then acknowledge.

:func:`record_events` is the only writer of the ``events`` table. It commits before it
returns, so a caller that answers after it has made the event durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from cadence.clock import now_ms
from cadence.engine.events import NewEvent
from cadence.store.schema.core import events

__all__ = ["IngestResult", "append_events", "record_events"]

CHUNK = 500


@dataclass(frozen=True)
class IngestResult:
    """What happened to a group of events: appended, or dropped as duplicates."""

    accepted: int
    duplicates: int


def append_events(conn: Connection, batch: Sequence[NewEvent]) -> IngestResult:
    """Append ``batch`` inside the caller's transaction, skipping known ``message_id``s."""
    if not batch:
        return IngestResult(0, 0)
    received = now_ms()
    unique: dict[str, NewEvent] = {}
    for item in batch:
        unique.setdefault(item.message_id, item)
    accepted = 0
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    items = list(unique.values())
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        known = set(
            conn.scalars(
                select(events.c.message_id).where(events.c.message_id.in_([e.message_id for e in chunk]))
            )
        )
        rows = [
            {
                "message_id": e.message_id,
                "type": e.type,
                "event": e.event,
                "user_id": e.user_id,
                "anonymous_id": e.anonymous_id,
                "ts_ms": e.ts_ms,
                "received_ms": e.received_ms or received,
                "source": e.source,
                "payload": e.payload,
            }
            for e in chunk
            if e.message_id not in known
        ]
        if rows:
            conn.execute(insert(events).on_conflict_do_nothing(index_elements=["message_id"]), rows)
            accepted += len(rows)
    return IngestResult(accepted=accepted, duplicates=len(batch) - accepted)


def record_events(*, engine: Engine, batch: Sequence[NewEvent]) -> IngestResult:
    """Append ``batch`` to the event log in one committed transaction."""
    with engine.begin() as conn:
        return append_events(conn, batch)
