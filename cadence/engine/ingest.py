"""Appending to the event log: dedupe by ``messageId``, commit, then acknowledge.

:func:`record_events` is the only writer of the ``events`` table. It commits before it
returns, so a caller that answers after it has made the event durable.

Ordering on PostgreSQL: ids come from a sequence when a row is inserted, but become
visible when its transaction commits, and concurrent transactions commit in any order.
The engine loop reads the log in id order after a checkpoint, so a transaction that
commits id 7 before another one commits id 5 could let it move past 5 for good. So every
appending transaction first *announces* a lower bound of the ids it may take: a shared
advisory lock whose key holds the sequence's last value + 1 (:data:`PG_ANNOUNCE`), held
until it ends; the loop reads only ids below :func:`append_horizon`, the lowest announced
bound (and above nothing not yet drawn from the sequence). On SQLite writers are
serialised (``BEGIN IMMEDIATE``), so ids commit in order.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import orjson

from cadence.clock import now_ms
from cadence.engine.events import NewEvent

if TYPE_CHECKING:  # not imported at run time: ``cadence import`` writes through the driver alone
    from sqlalchemy import Connection, Engine

dumps = orjson.dumps

__all__ = [
    "IngestResult",
    "Row",
    "TextRow",
    "append_events",
    "append_horizon",
    "copy_text_rows",
    "copy_text_rows_with_ids",
    "driver_copy_text_rows_with_ids",
    "driver_insert_text_rows",
    "driver_insert_text_rows_with_ids",
    "insert_text_rows_with_ids",
    "event_rows",
    "insert_rows",
    "insert_text_rows",
    "record_events",
]

#: Rows per SQLite ``INSERT`` statement, at most; fewer when the connection's
#: ``SQLITE_MAX_VARIABLE_NUMBER`` (9 parameters a row; 32,766 by default since SQLite 3.32,
#: 999 before) does not allow as many.
SQLITE_ROWS_PER_STATEMENT = 2048
COLUMNS = "message_id, type, event, user_id, anonymous_id, ts_ms, received_ms, source, payload"
#: PostgreSQL: the whole group is one JSON parameter, unpacked by the server in order.
PG_INSERT = (
    f"INSERT INTO events ({COLUMNS})"
    " SELECT r->>0, r->>1, r->>2, r->>3, r->>4, (r->>5)::bigint, (r->>6)::bigint, r->>7, r->8"
    " FROM jsonb_array_elements(CAST(%s AS JSONB)) WITH ORDINALITY AS rows(r, n) ORDER BY n"
    " ON CONFLICT (message_id) DO NOTHING"
)
#: The same for rows whose payload is JSON text already (file imports).
PG_INSERT_TEXT = PG_INSERT.replace("r->8", "CAST(r->>8 AS JSON)")
#: PostgreSQL's bulk load: no conflict handling, so only for rows known to be new. Binary:
#: the server reads numbers and texts as they are instead of parsing and unescaping text
#: (about a tenth of its work per event, measured).
PG_COPY = f"COPY events ({COLUMNS}) FROM STDIN (FORMAT BINARY)"
#: The binary types of :data:`COLUMNS` for ``COPY``; the payload (``json``, migration
#: ``ingest_0003``) goes as its text, which is ``json``'s binary form.
PG_COPY_TYPES = ("varchar",) * 5 + ("int8", "int8", "varchar", "text")

#: The sequence behind ``events.id`` (PostgreSQL's ``BIGSERIAL``; its cache must stay 1, the
#: default, so that its last value bounds every id a session has drawn).
PG_EVENT_ID_SEQUENCE = "events_id_seq"
#: Announced bounds are advisory-lock keys ``PG_APPEND_TAG + bound`` (bound < 2**48); pg_locks
#: shows such a key's high 32 bits as ``classid`` and its low 32 bits as ``objid``.
PG_APPEND_TAG = 0x0CAD << 48
#: The lowest id this transaction's appends may take: the sequence's last value + 1, read
#: before the lock is taken, and before any id is drawn (the caller's next statement).
PG_ANNOUNCE = (
    f"SELECT pg_advisory_xact_lock_shared({PG_APPEND_TAG}"
    f" + coalesce(pg_sequence_last_value('{PG_EVENT_ID_SEQUENCE}'), 0) + 1)"
)
#: The same bound as a lock of the session (the import's id reservations; released explicitly).
PG_ANNOUNCE_SESSION = (
    f"SELECT k, pg_advisory_lock_shared(k) FROM (SELECT {PG_APPEND_TAG}"
    f" + coalesce(pg_sequence_last_value('{PG_EVENT_ID_SEQUENCE}'), 0) + 1 AS k) AS bound"
)
PG_LAST_ID = f"SELECT coalesce(pg_sequence_last_value('{PG_EVENT_ID_SEQUENCE}'), 0)"
#: The lowest bound announced by a transaction or session of this database still holding it.
PG_ANNOUNCED = (
    "SELECT min(((classid::int8 & 65535) << 32) | objid::int8) FROM pg_locks"
    " WHERE locktype = 'advisory' AND objsubid = 1"
    f" AND classid::int8 >> 16 = {PG_APPEND_TAG >> 48}"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)

#: Rows with their ids given (the import reserves them in file order): COPY, and the insert
#: that skips stored messages, with ``id`` as the first column.
PG_COPY_IDS = f"COPY events (id, {COLUMNS}) FROM STDIN (FORMAT BINARY)"
PG_COPY_IDS_TYPES = ("int8", *PG_COPY_TYPES)
PG_INSERT_TEXT_IDS = (
    f"INSERT INTO events (id, {COLUMNS})"
    " SELECT (r->>0)::bigint, r->>1, r->>2, r->>3, r->>4, r->>5, (r->>6)::bigint, (r->>7)::bigint, r->>8,"
    " CAST(r->>9 AS JSON) FROM jsonb_array_elements(CAST(%s AS JSONB)) AS rows(r)"
    " ON CONFLICT (message_id) DO NOTHING"
)

Row = tuple[str, str, str | None, str | None, str | None, int, int, str, dict[str, Any]]
#: A row with the payload as JSON text.
TextRow = tuple[str, str, str | None, str | None, str | None, int, int, str, str]


def is_postgres(conn: Connection) -> bool:
    """True on PostgreSQL."""
    return conn.dialect.name == "postgresql"


@dataclass(frozen=True)
class IngestResult:
    """What happened to a group of events: appended, or dropped as duplicates."""

    accepted: int
    duplicates: int


def event_rows(batch: Sequence[NewEvent], received_ms: int | None = None) -> list[Row]:
    """``batch`` as rows in :data:`COLUMNS` order (payload still a dict); a zero ``received_ms``
    of an event becomes ``received_ms`` (default: now)."""
    received = received_ms or now_ms()
    return [
        (
            e.message_id,
            e.type,
            e.event,
            e.user_id,
            e.anonymous_id,
            e.ts_ms,
            e.received_ms or received,
            e.source,
            e.payload,
        )
        for e in batch
    ]


def _sqlite_sizes(n: int, most: int) -> Iterator[int]:
    """Statement sizes for ``n`` rows: full statements of ``most``, then powers of two,
    so that a few distinct statements (each prepared once per connection) cover any ``n``.

    >>> list(_sqlite_sizes(2 * 2048 + 100, 2048))
    [2048, 2048, 64, 32, 4]
    """
    while n >= most:
        yield most
        n -= most
    size = most
    while n:
        while size > n:
            size //= 2
        yield size
        n -= size


@functools.cache
def _sqlite_insert(rows: int) -> str:
    """A multi-row insert that skips stored ``message_id``s.

    ``INSERT OR IGNORE``, not ``ON CONFLICT (message_id) DO NOTHING``: with the latter a
    multi-row statement may still abort (a NOT NULL column), so SQLite keeps a statement
    journal, a copy of every page the statement changes, in a temporary file: 2.7 GB
    written for 1,000,000 events and a quarter of the insert's CPU time (measured). The
    only conflict an event row can meet is the unique ``message_id`` (the id is assigned,
    every NOT NULL column is set by :func:`event_rows` and the import, and the table has
    no CHECK or foreign key), so ignoring it is the same as before.
    """
    values = ",".join(["(?,?,?,?,?,?,?,?,?)"] * rows)
    return f"INSERT OR IGNORE INTO events ({COLUMNS}) VALUES {values}"


def _sqlite_most(dbapi: Any) -> int:
    try:
        limit = int(dbapi.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    except AttributeError:  # another driver: the smallest default
        limit = 999
    most = 1
    while most * 2 * 9 <= limit and most * 2 <= SQLITE_ROWS_PER_STATEMENT:
        most *= 2
    return most


def insert_rows(conn: Connection, rows: Sequence[Row]) -> int:
    """Insert ``rows`` inside the caller's transaction; return how many were new.

    Duplicates are dropped by the unique index (``ON CONFLICT DO NOTHING``; ``OR IGNORE`` on SQLite), so two
    writers racing with the same message never store it twice; the count is the
    driver's row count. Rows go in few large statements (all of them as one JSON
    parameter on PostgreSQL, multi-row ``VALUES`` on SQLite), keeping the per-row
    Python work small; while a statement runs, the driver releases the GIL.
    """
    if not rows:
        return 0
    if is_postgres(conn):
        conn.exec_driver_sql(PG_ANNOUNCE)
        result = conn.exec_driver_sql(PG_INSERT, (orjson.dumps(rows).decode(),))
        return max(result.rowcount, 0)
    flat = list(chain.from_iterable(rows))
    flat[8::9] = [dumps(payload).decode() for payload in flat[8::9]]
    return _sqlalchemy_insert_flat(conn, flat)


def insert_text_rows(conn: Connection, rows: Sequence[TextRow]) -> int:
    """:func:`insert_rows` for rows whose payload is JSON text already."""
    if not rows:
        return 0
    if is_postgres(conn):
        conn.exec_driver_sql(PG_ANNOUNCE)
        result = conn.exec_driver_sql(PG_INSERT_TEXT, (orjson.dumps(rows).decode(),))
        return max(result.rowcount, 0)
    return _sqlalchemy_insert_flat(conn, list(chain.from_iterable(rows)))


def driver_insert_text_rows(dbapi: Any, rows: Sequence[TextRow]) -> int:
    """SQLite only: :func:`insert_text_rows` on the driver's connection (inside its open transaction)."""
    if not rows:
        return 0
    cursor = dbapi.cursor()
    try:
        return _sqlite_insert_flat(cursor.execute, _sqlite_most(dbapi), list(chain.from_iterable(rows)))
    finally:
        cursor.close()


def _bind_none_directly() -> None:
    """Let pysqlite bind None without looking for an adapter first.

    For a parameter that is not an exact int, float or str, pysqlite looks up an
    ``__adapt__`` and a ``__conform__`` attribute, and each miss formats an
    AttributeError: for None, about a tenth of the instructions of an event's insert
    (measured with callgrind). A registered adapter is found first; this one returns
    None, which is bound as NULL as before. (The registry is the module's, so this holds
    for every connection of the process, with the same result.)
    """
    if (type(None), sqlite3.PrepareProtocol) not in sqlite3.adapters:
        sqlite3.register_adapter(type(None), {}.get)  # {}.get(x) is None: a C call


def _sqlite_insert_flat(execute: Callable[[str, tuple[Any, ...]], Any], most: int, flat: list[Any]) -> int:
    """Insert the rows of ``flat`` (9 values a row) with ``execute`` (a statement and its
    parameters -> a result with ``rowcount``), at most ``most`` rows a statement."""
    _bind_none_directly()
    accepted = 0
    start = 0
    for size in _sqlite_sizes(len(flat) // 9, most):
        result = execute(_sqlite_insert(size), tuple(flat[start * 9 : (start + size) * 9]))
        accepted += max(result.rowcount, 0)
        start += size
    return accepted


def _sqlalchemy_insert_flat(conn: Connection, flat: list[Any]) -> int:
    """:func:`_sqlite_insert_flat` through SQLAlchemy (its exceptions, as callers expect)."""
    return _sqlite_insert_flat(conn.exec_driver_sql, _sqlite_most(conn.connection.driver_connection), flat)


def copy_text_rows(conn: Connection, rows: Sequence[TextRow]) -> int:
    """PostgreSQL only: append ``rows``, all new, with ``COPY`` inside the caller's transaction.

    The cheapest way in for the server (no JSON array to unpack), but without conflict
    handling: when a ``message_id`` is stored already, or twice in ``rows``, it raises
    ``psycopg.errors.UniqueViolation`` and the transaction is lost; the caller then
    rolls back (to a savepoint taken before the call) and uses :func:`insert_text_rows`.
    The data goes in ``COPY``'s binary format (:data:`PG_COPY_TYPES`).
    """
    if not rows:
        return 0
    conn.exec_driver_sql(PG_ANNOUNCE)
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(PG_COPY) as copy:
            copy.set_types(PG_COPY_TYPES)
            write = copy.write_row
            for row in rows:
                write(row)
        return max(cursor.rowcount, 0)
    finally:
        cursor.close()


def append_horizon(conn: Connection) -> int | None:
    """PostgreSQL: every id below this is committed or never will be; None on SQLite.

    The lowest bound announced by an appending transaction (or an import's reservation)
    still in flight, or the sequence's last value + 1 when none is. The sequence is read
    *before* the locks: an id drawn by then was drawn after its writer announced, so that
    writer is seen holding its lock unless it has ended (and its rows are visible to a
    statement that starts after this call, since PostgreSQL makes a commit visible before
    it releases the transaction's locks).
    """
    if not is_postgres(conn):
        return None
    last = int(conn.exec_driver_sql(PG_LAST_ID).scalar_one())
    announced = conn.exec_driver_sql(PG_ANNOUNCED).scalar_one()
    horizon = last + 1
    return horizon if announced is None else min(horizon, int(announced))


def copy_text_rows_with_ids(conn: Connection, rows: Sequence[TextRow], ids: Sequence[int]) -> int:
    """PostgreSQL only: :func:`copy_text_rows` with each row's id given (``ids[i]`` for ``rows[i]``).

    Announces nothing: the caller holds an announced bound below ``ids`` (see the module
    docstring) from before it drew them until this transaction has ended.
    """
    return driver_copy_text_rows_with_ids(conn.connection.driver_connection, rows, ids)


def driver_copy_text_rows_with_ids(dbapi: Any, rows: Sequence[TextRow], ids: Sequence[int]) -> int:
    """:func:`copy_text_rows_with_ids` on the driver's (psycopg) connection, inside its open transaction."""
    if not rows:
        return 0
    cursor = dbapi.cursor()
    try:
        with cursor.copy(PG_COPY_IDS) as copy:
            copy.set_types(PG_COPY_IDS_TYPES)
            write = copy.write_row
            for event_id, row in zip(ids, rows, strict=True):
                write((event_id, *row))
        return max(int(cursor.rowcount), 0)
    finally:
        cursor.close()


def insert_text_rows_with_ids(conn: Connection, rows: Sequence[TextRow], ids: Sequence[int]) -> int:
    """PostgreSQL only: :func:`insert_text_rows` (stored messages skipped) with each row's id given.

    An id left unused by a skipped row is a gap in the log, as a rolled-back insert leaves.
    """
    return driver_insert_text_rows_with_ids(conn.connection.driver_connection, rows, ids)


def driver_insert_text_rows_with_ids(dbapi: Any, rows: Sequence[TextRow], ids: Sequence[int]) -> int:
    """:func:`insert_text_rows_with_ids` on the driver's (psycopg) connection, inside its open transaction."""
    if not rows:
        return 0
    data = orjson.dumps([(event_id, *row) for event_id, row in zip(ids, rows, strict=True)]).decode()
    cursor = dbapi.cursor()
    try:
        cursor.execute(PG_INSERT_TEXT_IDS, (data,))
        return max(int(cursor.rowcount), 0)
    finally:
        cursor.close()


def append_events(conn: Connection, batch: Sequence[NewEvent]) -> IngestResult:
    """Append ``batch`` inside the caller's transaction, skipping known ``message_id``s.

    Events keep their order in the log (ascending ``id``).
    """
    if not batch:
        return IngestResult(0, 0)
    accepted = insert_rows(conn, event_rows(batch))
    return IngestResult(accepted=accepted, duplicates=len(batch) - accepted)


def record_events(*, engine: Engine, batch: Sequence[NewEvent]) -> IngestResult:
    """Append ``batch`` to the event log in one committed transaction."""
    with engine.begin() as conn:
        return append_events(conn, batch)
