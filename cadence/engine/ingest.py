"""Appending to the event log: dedupe by ``messageId``, commit, then acknowledge.

:func:`record_events` is the only writer of the ``events`` table. It commits before it
returns, so a caller that answers after it has made the event durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from sqlalchemy import Connection, Engine

from cadence.clock import now_ms
from cadence.engine.events import NewEvent
from cadence.store.fast import dialect_sql

__all__ = ["IngestResult", "append_events", "record_events"]

CHUNK = 1000
INSERT_EVENT = (
    "INSERT INTO events (message_id, type, event, user_id, anonymous_id, ts_ms, received_ms, source, payload)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?::json) ON CONFLICT (message_id) DO NOTHING"
)


@dataclass(frozen=True)
class IngestResult:
    """What happened to a group of events: appended, or dropped as duplicates."""

    accepted: int
    duplicates: int


def append_events(conn: Connection, batch: Sequence[NewEvent]) -> IngestResult:
    """Append ``batch`` inside the caller's transaction, skipping known ``message_id``s.

    Duplicates are dropped by the unique index (``ON CONFLICT DO NOTHING``), so two
    writers racing with the same message never store it twice; the accepted count is
    the driver's row count.
    """
    if not batch:
        return IngestResult(0, 0)
    received = now_ms()
    dumps = orjson.dumps
    rows = [
        (
            e.message_id,
            e.type,
            e.event,
            e.user_id,
            e.anonymous_id,
            e.ts_ms,
            e.received_ms or received,
            e.source,
            dumps(e.payload).decode(),
        )
        for e in batch
    ]
    accepted = 0
    for start in range(0, len(rows), CHUNK):
        result = conn.exec_driver_sql(
            dialect_sql(conn, INSERT_EVENT),
            rows[start : start + CHUNK],
        )
        accepted += max(result.rowcount, 0)
    return IngestResult(accepted=accepted, duplicates=len(batch) - accepted)


def record_events(*, engine: Engine, batch: Sequence[NewEvent]) -> IngestResult:
    """Append ``batch`` to the event log in one committed transaction."""
    with engine.begin() as conn:
        return append_events(conn, batch)
