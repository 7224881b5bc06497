"""File imports: NDJSON of Segment-spec calls, or CSV with a column mapping.

Lines are read in groups of ``batch_size``; each group's good lines are appended in one
transaction, written in pieces by a writer thread while the next piece is parsed. Bad
lines are reported with their line number and reason and never stop the import. A
re-run of the same file appends nothing twice (``messageId``, or the content hash of a
line without one). A good line that gives a field cadence cannot use as sent (an unusable
``bounce_type``, a consent value of the wrong type, a channel name in another case, ...) is
stored and reported with its line number and field, as the API's ``warnings`` say them
(:func:`~cadence.engine.events.call_warnings`).

An NDJSON line in the common shape takes the fast path of :mod:`cadence.engine.fastcall`
(one typed decode, the payload kept as the line's JSON text); any other line, and every
CSV row, goes through :func:`~cadence.engine.events.parse_call`, which names the field
of an error. On PostgreSQL a group goes in with ``COPY`` when none of its messages is
stored yet, else with ``INSERT ... ON CONFLICT DO NOTHING``, and two connections write
alternate groups at once (:class:`_PgWriters`: ids reserved in file order, groups
committed in file order, the engine loop held below ids not yet committed).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gc
import io
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import orjson

from cadence.clock import now_ms
from cadence.engine.events import NewEvent, call_warnings, may_warn, parse_call
from cadence.engine.fastcall import text_rows
from cadence.engine.ingest import (
    PG_ANNOUNCE_SESSION,
    PG_EVENT_ID_SEQUENCE,
    TextRow,
    driver_copy_text_rows_with_ids,
    driver_insert_text_rows,
    driver_insert_text_rows_with_ids,
)
from cadence.errors import EventError
from cadence.store.driver import DriverTarget, begin_sqlite_write

if TYPE_CHECKING:  # not imported at run time: ``cadence import`` may run without SQLAlchemy
    from sqlalchemy import Engine

__all__ = ["ImportReport", "ImportWarning", "import_file", "parse_mapping"]

#: SQLite page cache of the importing connection, in KiB (it stays with that pooled connection).
SQLITE_IMPORT_CACHE_KIB = 131_072
#: Lines per committed group unless the caller says otherwise (``--batch-size``).
DEFAULT_BATCH_SIZE = 100_000
#: A group is parsed and handed to the writer in pieces of at most this many lines ...
PIECE_LINES = 10_000
#: ... or in this many pieces, larger ones, for a very large group: on PostgreSQL each piece
#: is a savepoint, and a transaction with more than 64 subtransactions slows every other
#: session's snapshots.
MAX_PIECES = 32
#: PostgreSQL: connections (server processes) writing groups at once (see :class:`_PgWriters`).
PG_WRITERS = 2
#: Warnings an :class:`ImportReport` keeps to show; every one is in the warnings file.
SHOWN_WARNINGS = 20

SEGMENT_FIELDS = {
    "type",
    "userId",
    "anonymousId",
    "messageId",
    "event",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "previousId",
    "groupId",
    "name",
    "category",
}


class ImportWarning(NamedTuple):
    """A field of a stored line that cadence cannot use as sent (the API's ``warnings``)."""

    line: int  # the file's line (NDJSON) or record's first line (CSV)
    field: str
    warning: str


@dataclass
class ImportReport:
    """What an import did."""

    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects_path: Path | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    warned: int = 0  # warnings, on lines that were stored (a line may have several)
    warnings_path: Path | None = None  # every warning, one JSON object a line
    warning_fields: dict[str, int] = field(default_factory=dict)  # warnings by field
    first_warnings: list[ImportWarning] = field(default_factory=list)  # the first SHOWN_WARNINGS


def parse_mapping(pairs: list[str]) -> dict[str, str]:
    """``["user=userId", "amount=properties.revenue"]`` -> ``{column: field}``.

    >>> parse_mapping(["user=userId", "amount=properties.revenue"])
    {'user': 'userId', 'amount': 'properties.revenue'}
    """
    mapping = {}
    for pair in pairs:
        column, sep, target = pair.partition("=")
        if not sep or not column or not target:
            raise ValueError(
                f"--map {pair!r}: expected COLUMN=FIELD, e.g. user=userId or amount=properties.revenue"
            )
        mapping[column.strip()] = target.strip()
    return mapping


def _set_path(obj: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        obj = obj.setdefault(part, {})
    obj[parts[-1]] = value


def _csv_value(text: str) -> Any:
    """CSV cells are text; numbers become numbers, empty cells are absent."""
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def csv_row_to_call(row: dict[str, str], mapping: dict[str, str], default_type: str) -> dict[str, Any]:
    """One CSV row as a Segment call: mapped columns go where the mapping says, Segment-named
    columns to their field, the rest into ``properties`` (``traits`` for identify).

    >>> csv_row_to_call({"user": "u1", "event": "Order Completed", "amount": "12.5"},
    ...     {"user": "userId"}, "track")
    {'type': 'track', 'userId': 'u1', 'event': 'Order Completed', 'properties': {'amount': 12.5}}
    """
    call: dict[str, Any] = {"type": default_type}
    bag = "traits" if default_type == "identify" else "properties"
    for column, raw in row.items():
        if column is None:
            continue
        value = _csv_value(raw) if column not in ("userId", "anonymousId", "messageId") else (raw or None)
        if value is None:
            continue
        target = mapping.get(column)
        if target is None:
            target = column if column in SEGMENT_FIELDS else f"{bag}.{column}"
        if target in ("userId", "anonymousId", "messageId", "event", "previousId"):
            value = str(raw)
        _set_path(call, target, value)
    return call


def _ndjson_chunks(handle: IO[bytes], size: int) -> Iterator[list[tuple[int, bytes, Any]]]:
    """Lists of ``size`` (number, raw line, None): the lines are decoded by the caller."""
    number = 0
    chunk: list[tuple[int, bytes, Any]] = []
    while True:
        lines = handle.readlines(1 << 20)  # whole lines, about 1 MiB: one read call
        if not lines:
            break
        if number == 0 and lines[0].startswith(codecs.BOM_UTF8):  # as editors on Windows save UTF-8
            lines[0] = lines[0][len(codecs.BOM_UTF8) :]
        chunk += [(n, raw, None) for n, raw in enumerate(lines, number + 1)]
        number += len(lines)
        while len(chunk) >= size:
            yield chunk[:size]
            chunk = chunk[size:]
    if chunk:
        yield chunk


def _nul_path(value: Any, path: str) -> str | None:
    """The dotted path of the first text in ``value`` that holds a NUL character, if any.

    >>> _nul_path({"properties": {"a": ["x", "y\\x00"]}}, "")
    'properties.a.1'
    """
    if type(value) is str:
        return path if "\x00" in value else None
    if type(value) is dict:
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if "\x00" in key:
                return where
            found = _nul_path(item, where)
            if found is not None:
                return found
    elif type(value) is list:
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


def _storable(event: NewEvent) -> NewEvent:
    """``event``, or the error for a NUL character, which PostgreSQL cannot store in text."""
    columns = (
        ("messageId", event.message_id),
        ("event" if event.type == "track" else "name", event.event),
        ("userId", event.user_id),
        ("anonymousId", event.anonymous_id),
    )
    where = next((name for name, value in columns if value and "\x00" in value), None)
    if where is None:
        where = _nul_path(event.payload, "")
    if where is not None:
        raise EventError(f"{where}: the NUL character (\\u0000) cannot be stored", field=where)
    return event


def _csv_chunks(
    handle: IO[bytes], mapping: dict[str, str], default_type: str, size: int
) -> Iterator[list[tuple[int, bytes, Any]]]:
    # utf-8-sig: a byte order mark (Excel's "CSV UTF-8") is not part of the first column's name
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")
    try:
        reader = csv.DictReader(text)
        if reader.fieldnames is None:
            return
        missing = sorted(set(mapping) - set(reader.fieldnames))
        if missing:
            raise ValueError(f"--map names column(s) not in the CSV header: {', '.join(missing)}")
        chunk: list[tuple[int, bytes, Any]] = []
        for row in reader:
            raw = ",".join(f"{k}={v}" for k, v in row.items()).encode()
            if None in row:
                chunk.append(
                    (reader.line_num, raw, EventError("more cells than header columns", field="line"))
                )
            elif None in row.values():  # DictReader fills a short row's missing cells with None
                cells = sum(v is not None for v in row.values())
                error = EventError(f"{cells} cells where the header has {len(row)} columns", field="line")
                chunk.append((reader.line_num, raw, error))
            else:
                chunk.append((reader.line_num, raw, csv_row_to_call(row, mapping, default_type)))
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    finally:
        text.detach()  # the caller owns ``handle``: do not let the wrapper close it


class _Target:
    """Where an import writes: new DB-API connections from an engine's pool or from the driver.

    Writers work on the driver's own connection (``sqlite3`` or psycopg) through either: an
    :class:`~sqlalchemy.Engine` (tests, the API process) or a
    :class:`~cadence.store.driver.DriverTarget` (``cadence import``: no SQLAlchemy loaded).
    """

    def __init__(self, engine: Engine | DriverTarget) -> None:
        if isinstance(engine, DriverTarget):
            self.postgres = engine.postgres
            self._connect: Callable[[], Any] = engine.connect
        else:
            self.postgres = engine.dialect.name == "postgresql"
            self._connect = engine.raw_connection

    def connect(self) -> tuple[Any, Any]:
        """(a connection to close when done, the driver's connection inside it)."""
        handle = self._connect()
        return handle, getattr(handle, "driver_connection", None) or handle


def _close(handle: Any, raw: Any, *, autocommit: bool = False) -> None:
    """Give ``handle`` back (to its pool, or close it); one left in autocommit mode is put back in
    transaction mode first, or not reused if that fails."""
    try:
        if autocommit:
            raw.autocommit = False
    except Exception:  # noqa: BLE001 - a broken connection: the pool must not hand it out again
        invalidate = getattr(handle, "invalidate", None)
        if invalidate is not None:
            invalidate()
    handle.close()


class _Writer:
    """SQLite: appends row pieces on a thread of its own; a group of pieces is one transaction.

    The driver releases the GIL while the database works (SQLite's B-trees and commits),
    so the next piece is parsed meanwhile: on two cores the import takes about as long as
    the larger of the two parts instead of their sum. At most ``depth`` pieces wait, so
    memory stays bounded; an error rolls back the open group and stops the import at the
    next piece.

    A group (``--batch-size`` lines) is parsed and written in pieces of at most
    :data:`PIECE_LINES`: the writer starts on a group before it is all parsed, and the
    transaction is committed after its last piece. Large groups are cheaper per event
    (every commit writes each touched index page once more, and the id indexes are touched
    all over).
    """

    def __init__(self, engine: Engine | DriverTarget, *, threaded: bool = True, depth: int = 3) -> None:
        self.target = _Target(engine)
        self.accepted = 0
        self.error: BaseException | None = None
        self._conn: tuple[Any, Any] | None = None  # (handle, the driver's connection)
        self._open = False  # a group's transaction is open
        self._pending = 0
        self._queue: queue.Queue[tuple[list[TextRow], bool] | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="cadence-import-writer", daemon=True)
            self._thread.start()

    def _write(self, rows: list[TextRow], end: bool) -> None:
        if self._conn is None:
            self._conn = self.target.connect()
            # Inserts land all over the indexes of a growing table: a page cache of 128 MiB
            # (the default is 2 MiB) saves re-reading their pages (1,000,000 events: 30 s of
            # CPU instead of 34, 2/3 of the wall time, measured).
            self._conn[1].execute(f"PRAGMA cache_size = -{SQLITE_IMPORT_CACHE_KIB}")
        raw = self._conn[1]
        if not self._open:
            begin_sqlite_write(raw)  # the write lock, then BEGIN IMMEDIATE
            self._open = True
        if rows:
            self._pending += driver_insert_text_rows(raw, rows)
        if end:
            raw.commit()  # and lets the next writer in
            self._open = False
            self.accepted += self._pending
            self._pending = 0

    def _abort(self) -> None:
        """Roll back the open group (if any) and give the connection back."""
        try:
            if self._open and self._conn is not None:
                self._conn[1].rollback()
        finally:
            self._open = False
            self._pending = 0
            if self._conn is not None:
                handle, raw = self._conn
                self._conn = None
                _close(handle, raw)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the reader stops at its next put
            try:
                self._write(*item)
            except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
                self.error = exc
                with contextlib.suppress(BaseException):  # the first error is the one to report
                    self._abort()

    def expect(self, lines: int) -> None:
        """A piece of at most ``lines`` rows comes next (nothing to prepare on SQLite)."""

    def put(self, rows: list[TextRow], *, end: bool) -> None:
        """Write ``rows`` (commit the group after them when ``end``), or queue them (blocks while
        ``depth`` pieces wait); re-raise a writer error."""
        if self._thread is None:
            try:
                self._write(rows, end)
            except BaseException:
                self._abort()
                raise
            return
        if self.error is not None:
            raise self.error
        self._queue.put((rows, end))

    def close(self) -> None:
        """Wait until every queued piece is written and its group committed; re-raise a writer error.

        A group left open (the reader stopped on an error) is rolled back.
        """
        try:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                if self.error is not None:
                    raise self.error
        finally:
            self._abort()


class _Stop(Exception):
    """A writer gives up its group because another one failed (that error is reported)."""


class _PgWriters:
    """PostgreSQL: groups written by :data:`PG_WRITERS` connections at once, in file order.

    The server's work per event (the payload, four index entries) is the import's
    bound on PostgreSQL, and one connection is one server process: so group ``g`` goes to
    connection ``g % PG_WRITERS``, each on a thread of its own (the driver releases the GIL
    while the server works), while the reading thread parses on. Each group is still one
    transaction, written in pieces as :class:`_Writer` does: binary ``COPY`` under a
    savepoint, or, when a message of the piece is stored already, ``INSERT ... ON CONFLICT
    DO NOTHING``, as for the pieces after it until one has no duplicate.

    File order and the log's order, with two transactions in flight:

    * Ids are reserved on a connection (and a thread) of their own, piece by piece in file
      order (``nextval``, one for each line of the piece, while the reading thread parses
      it), and written explicitly: ids follow the file.
    * Before a group's first reservation that connection announces a lower bound of its
      ids (a session advisory lock, :data:`~cadence.engine.ingest.PG_ANNOUNCE_SESSION`),
      released only after the group's transaction has ended: the engine loop does not read
      past an id that may still be committed (:func:`~cadence.engine.ingest.append_horizon`).
    * Groups commit in file order (a writer waits for the group before its own), so the
      committed lines are a prefix of the file: after a crash, running the import again
      appends the rest, in order.
    * A message that repeats one of a group not yet committed is dropped by the reading
      thread (the first is kept), so the two transactions never insert the same key, and
      neither ever waits for the other inside the server (which, with the commit order,
      could deadlock). Messages of committed groups and earlier imports are found by the
      unique index, as before.
    """

    def __init__(self, engine: Engine | DriverTarget, *, writers: int = 0, depth: int = 6) -> None:
        self.target = _Target(engine)
        self.accepted = 0
        self.error: BaseException | None = None
        self._writers = writers or PG_WRITERS
        self._reserver_handle, self._reserver = self.target.connect()
        self._reserver.autocommit = True
        #: Only this thread uses ``_reserver``, in submission order: announcements, reservations, releases.
        self._ids_thread = ThreadPoolExecutor(1, thread_name_prefix="cadence-import-ids")
        self._ids: Future[Sequence[int]] | None = None  # the next piece's reservation
        self._group = -1  # the group being read (the next put's), -1 before the first
        self._open = False
        self._keys: dict[int, Future[int]] = {}  # group -> its announced lock key
        #: The message ids of each group not yet committed (dicts as ordered sets).
        self._uncommitted: dict[int, dict[str, None]] = {}
        self._done = threading.Condition()
        self._committed = -1  # every group up to this one is committed
        self._queues: list[queue.Queue[tuple[int, list[TextRow], Sequence[int], bool] | None]] = [
            queue.Queue(maxsize=depth) for _ in range(self._writers)
        ]
        self._threads = [
            threading.Thread(target=self._run, args=(q,), name=f"cadence-import-writer-{k}", daemon=True)
            for k, q in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()

    # -- the reading thread
    def _forget_committed(self) -> None:
        """Release the announcements of committed groups and forget their message ids."""
        committed = self._committed
        for group in [g for g in self._keys if g <= committed]:
            self._ids_thread.submit(self._release, self._keys.pop(group))
            self._uncommitted.pop(group, None)

    def _announce(self) -> int:
        key, _ = self._reserver.execute(PG_ANNOUNCE_SESSION).fetchone()
        return int(key)

    def _release(self, key: Future[int]) -> None:
        self._reserver.execute("SELECT pg_advisory_unlock_shared(%s)", (key.result(),))

    def _reserve(self, n: int) -> Sequence[int]:
        """``n`` new ids, ascending: a range unless another writer drew some meanwhile."""
        if n == 0:
            return ()
        low, high, scattered = self._reserver.execute(
            f"WITH drawn AS MATERIALIZED (SELECT nextval('{PG_EVENT_ID_SEQUENCE}') AS v"
            " FROM generate_series(1, %s))"
            " SELECT min(v), max(v), CASE WHEN max(v) - min(v) + 1 = count(*) THEN NULL"
            " ELSE array_agg(v ORDER BY v) END FROM drawn",
            (n,),
        ).fetchone()
        return range(low, high + 1) if scattered is None else scattered

    def expect(self, lines: int) -> None:
        """A piece of at most ``lines`` rows comes next: reserve its ids while it is parsed.

        (The server draws ids at about a microsecond each: off the reading thread's path.
        Ids left over by rejected or repeated lines are gaps in the log.)
        """
        self._forget_committed()
        if not self._open:
            self._group += 1
            self._open = True
            self._keys[self._group] = self._ids_thread.submit(self._announce)
        self._ids = self._ids_thread.submit(self._reserve, lines)

    def _first_of_each(self, rows: list[TextRow], group: int) -> list[TextRow]:
        """``rows`` without a message repeated in them or in an uncommitted group (the first is
        kept); their message ids are added to ``group``'s."""
        message_ids = dict.fromkeys([row[0] for row in rows])
        groups = self._uncommitted.values()
        if len(message_ids) == len(rows) and all(ids.keys().isdisjoint(message_ids) for ids in groups):
            unique = rows  # the common case, checked at C speed
        else:
            seen: set[str] = set()
            unique = [
                row
                for row in rows
                if not (row[0] in seen or seen.add(row[0]) or any(row[0] in ids for ids in groups))  # type: ignore[func-returns-value]
            ]
            message_ids = dict.fromkeys([row[0] for row in unique])
        self._uncommitted.setdefault(group, {}).update(message_ids)
        return unique

    def put(self, rows: list[TextRow], *, end: bool) -> None:
        """Queue ``rows`` (a piece of the current group; the group ends after it when ``end``).

        Blocks while ``depth`` pieces wait for the group's connection; re-raises a writer error.
        """
        if self.error is not None:
            raise self.error
        if self._ids is None:
            self.expect(len(rows))
        assert self._ids is not None
        reserved, self._ids = self._ids.result(), None
        group = self._group
        unique = self._first_of_each(rows, group)
        self._queues[group % self._writers].put((group, unique, reserved[: len(unique)], end))
        if end:
            self._open = False

    def close(self) -> None:
        """Wait until every queued piece is written and its group committed; re-raise a writer error.

        A group left open (the reader stopped on an error) is rolled back (it is the last one
        queued, so no writer waits for it), and so is every group after one that failed.
        """
        try:
            for q in self._queues:
                q.put(None)
            for thread in self._threads:
                thread.join()
            if self.error is not None:
                raise self.error
        finally:
            with contextlib.suppress(BaseException):
                self._ids_thread.submit(self._reserver.execute, "SELECT pg_advisory_unlock_all()").result()
            self._ids_thread.shutdown()
            _close(self._reserver_handle, self._reserver, autocommit=True)

    # -- the writing threads
    def _fail(self, exc: BaseException) -> None:
        with self._done:
            if self.error is None:
                self.error = exc
            self._done.notify_all()

    def _run(self, jobs: queue.Queue[tuple[int, list[TextRow], Sequence[int], bool] | None]) -> None:
        conn: tuple[Any, Any] | None = None  # (handle, the driver's connection)
        copy = True
        written = 0
        try:
            while (item := jobs.get()) is not None:
                if self.error is not None:
                    continue  # drain: the reader stops at its next put
                group, rows, ids, end = item
                try:
                    if conn is None:
                        conn = self.target.connect()
                    raw = conn[1]  # its transaction begins with the first statement
                    if rows:
                        accepted, copy = _write_pg_piece(raw, rows, ids, copy=copy)
                        written += accepted
                    if end:
                        with self._done:
                            while self._committed != group - 1 and self.error is None:
                                self._done.wait()
                            if self.error is not None:
                                raise _Stop("another group failed")
                            raw.commit()
                            self.accepted += written
                            written = 0
                            self._committed = group
                            self._done.notify_all()
                except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
                    self._fail(exc)
                    with contextlib.suppress(BaseException):
                        if conn is not None:
                            conn[1].rollback()
        finally:
            if conn is not None:
                with contextlib.suppress(BaseException):
                    conn[1].rollback()
                _close(*conn)


def _write_pg_piece(raw: Any, rows: list[TextRow], ids: Sequence[int], *, copy: bool) -> tuple[int, bool]:
    """Append ``rows`` (no message twice) with ``ids`` on the driver's connection ``raw``, in its open
    transaction: by ``COPY`` when ``copy`` and none is stored yet, else by ``INSERT ... ON CONFLICT
    DO NOTHING``; (how many were new, ``copy`` for the next piece)."""
    from psycopg.errors import UniqueViolation

    if copy:
        raw.execute("SAVEPOINT cadence_import_piece")
        try:
            accepted = driver_copy_text_rows_with_ids(raw, rows, ids)
        except UniqueViolation:
            raw.execute("ROLLBACK TO SAVEPOINT cadence_import_piece")  # some are stored already
        else:
            raw.execute("RELEASE SAVEPOINT cadence_import_piece")
            return accepted, True
    accepted = driver_insert_text_rows_with_ids(raw, rows, ids)
    return accepted, accepted == len(rows)


def import_file(
    *,
    engine: Engine | DriverTarget,
    path: Path,
    fmt: str | None = None,
    mapping: dict[str, str] | None = None,
    default_type: str = "track",
    rejects_path: Path | None = None,
    warnings_path: Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    source: str = "import",
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import ``path`` (``.ndjson``/``.jsonl`` or ``.csv``, or as ``fmt`` says).

    :param rejects_path: where rejected lines go (default ``FILE.rejects.ndjson``; written only if any).
    :param warnings_path: where the warnings on stored lines go (default ``FILE.warnings.ndjson``;
        written only if any), each with its line number and field.
    :param batch_size: lines per group; each group's good lines are committed together.
    :param progress: called with the number of bytes read so far after each piece of a group.
    """
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "ndjson")
    if fmt not in ("csv", "ndjson"):
        raise ValueError(f"unknown format {fmt!r}: use csv or ndjson")
    report = ImportReport(
        rejects_path=rejects_path or path.with_name(path.name + ".rejects.ndjson"),
        warnings_path=warnings_path or path.with_name(path.name + ".warnings.ndjson"),
    )
    rejects: IO[bytes] | None = None
    warnings_file: IO[bytes] | None = None
    received = now_ms()
    reasons = report.reasons

    def reject(number: int, raw: bytes, exc: EventError) -> None:
        nonlocal rejects
        report.rejected += 1
        key = exc.field or "line"
        reasons[key] = reasons.get(key, 0) + 1
        if rejects is None:
            assert report.rejects_path is not None
            rejects = report.rejects_path.open("wb")
        rejects.write(
            orjson.dumps(
                {
                    "line": number,
                    "field": exc.field,
                    "error": str(exc),
                    "raw": raw.decode("utf-8", "replace").rstrip("\n"),
                }
            )
            + b"\n"
        )

    def warn(number: int, payload: Any, call_type: str) -> None:
        """Report what ``payload``, stored from line ``number``, gives that cadence cannot use."""
        nonlocal warnings_file
        found = call_warnings(payload, call_type)
        if not found:
            return
        if warnings_file is None:
            assert report.warnings_path is not None
            warnings_file = report.warnings_path.open("wb")
        fields = report.warning_fields
        for where, warning in found:
            report.warned += 1
            fields[where] = fields.get(where, 0) + 1
            if len(report.first_warnings) < SHOWN_WARNINGS:
                report.first_warnings.append(ImportWarning(number, where, warning))
            warnings_file.write(orjson.dumps({"line": number, "field": where, "warning": warning}) + b"\n")

    postgres = _Target(engine).postgres
    loads = orjson.loads
    fast_options: dict[str, Any] = {"default_type": default_type, "received_ms": received, "source": source}

    def general(number: int, raw: bytes, parsed: Any) -> TextRow | None:
        """The general path: decode (NDJSON), validate, warn, and the row; None for a blank line."""
        if parsed is None:
            try:
                parsed = loads(raw)
            except orjson.JSONDecodeError as exc:
                if not raw.strip():
                    return None
                raise EventError(f"not valid JSON: {exc}", field="line") from None
        elif isinstance(parsed, EventError):
            raise parsed
        if type(parsed) is dict and "type" not in parsed:
            parsed["type"] = default_type
        event = parse_call(parsed, received_ms=received, source=source)
        if postgres and (b"\\u0000" in raw or b"\x00" in raw):
            _storable(event)
        warn(number, parsed, event.type)
        return (
            event.message_id,
            event.type,
            event.event,
            event.user_id,
            event.anonymous_id,
            event.ts_ms,
            received,
            source,
            orjson.dumps(event.payload).decode(),
        )

    def good_rows(piece: list[tuple[int, bytes, Any]]) -> list[TextRow]:
        """The rows of ``piece``'s good lines; bad ones are rejected, blank ones skipped."""
        good: list[TextRow] = []
        blank = 0
        fast = text_rows([raw for _, raw, _ in piece], **fast_options) if fmt == "ndjson" else repeat(None)
        for (number, raw, parsed), row in zip(piece, fast, strict=False):
            if row is None:
                try:
                    row = general(number, raw, parsed)
                except EventError as exc:
                    reject(number, raw, exc)
                    continue
                if row is None:
                    blank += 1
                    continue
            elif may_warn(row[8], row[1], row[2]):  # the fast path decoded no payload: only these are
                warn(number, {**loads(row[8]), "event": row[2]}, row[1])
            good.append(row)
        report.lines += len(piece) - blank
        return good

    with path.open("rb") as handle:
        chunks = (
            _csv_chunks(handle, mapping or {}, default_type, batch_size)
            if fmt == "csv"
            else _ndjson_chunks(handle, batch_size)
        )
        writer: _Writer | _PgWriters = _PgWriters(engine) if postgres else _Writer(engine)
        collecting = gc.isenabled()
        # The groups are millions of short-lived, acyclic objects: reference counting frees
        # them, and the cycle collector would only rescan them (about a third of the CPU
        # time of an import, measured). Cycles made meanwhile are collected after.
        gc.disable()
        try:
            for group in chunks:
                # A group is one transaction, parsed and written in pieces of about equal size.
                pieces = min(math.ceil(len(group) / PIECE_LINES), MAX_PIECES)
                step = math.ceil(len(group) / pieces)
                for start in range(0, len(group), step):
                    piece = group[start : start + step]
                    writer.expect(len(piece))  # PostgreSQL reserves its ids meanwhile
                    writer.put(good_rows(piece), end=start + step >= len(group))
                    if progress is not None:
                        progress(handle.tell())
        finally:
            try:
                writer.close()
            finally:
                if collecting:
                    gc.enable()
                if rejects is not None:
                    rejects.close()
                if warnings_file is not None:
                    warnings_file.close()
    report.accepted = writer.accepted
    report.duplicates = report.lines - report.rejected - report.accepted
    if report.rejected == 0:
        report.rejects_path = None
    if report.warned == 0:
        report.warnings_path = None
    return report
