"""File imports: NDJSON of Segment-spec calls, or CSV with a column mapping.

Lines are read in groups of ``batch_size``; each group's good lines are appended in one
transaction, written in pieces by a writer thread while the next piece is parsed. Bad
lines are reported with their line number and reason and never stop the import. A
re-run of the same file appends nothing twice (``messageId``, or the content hash of a
line without one).

An NDJSON line in the common shape takes the fast path of :mod:`cadence.engine.fastcall`
(one typed decode, the payload kept as the line's JSON text); any other line, and every
CSV row, goes through :func:`~cadence.engine.events.parse_call`, which names the field
of an error. On PostgreSQL a group goes in with ``COPY`` when none of its messages is
stored yet, else with ``INSERT ... ON CONFLICT DO NOTHING``.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import Connection, Engine, RootTransaction

from cadence.clock import now_ms
from cadence.engine.events import NewEvent, parse_call
from cadence.engine.fastcall import text_rows
from cadence.engine.ingest import TextRow, copy_text_rows, insert_text_rows
from cadence.errors import EventError
from cadence.store.db import is_postgres

__all__ = ["ImportReport", "import_file", "parse_mapping"]

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


@dataclass
class ImportReport:
    """What an import did."""

    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects_path: Path | None = None
    reasons: dict[str, int] = field(default_factory=dict)


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
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
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
            else:
                chunk.append((reader.line_num, raw, csv_row_to_call(row, mapping, default_type)))
            if len(chunk) >= size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    finally:
        text.detach()  # the caller owns ``handle``: do not let the wrapper close it


class _Writer:
    """Appends row pieces on a thread of its own; a group of pieces is one transaction.

    The driver releases the GIL while the database works (PostgreSQL's server, SQLite's
    B-trees and commits), so the next piece is parsed meanwhile: on two cores the import
    takes about as long as the larger of the two parts instead of their sum. At most
    ``depth`` pieces wait, so memory stays bounded; an error rolls back the open group and
    stops the import at the next piece.

    A group (``--batch-size`` lines) is parsed and written in pieces of at most
    :data:`PIECE_LINES`: the writer starts on a group before it is all parsed, and the
    transaction is committed after its last piece. Large groups are cheaper per event
    (every commit writes each touched index page once more, and the id indexes are touched
    all over).

    On PostgreSQL a piece goes in with ``COPY`` (a third of the server's work of unpacking
    one JSON parameter) under a savepoint; a message stored already makes ``COPY`` fail,
    and that piece is written again, after the savepoint is rolled back, with
    ``INSERT ... ON CONFLICT DO NOTHING``, as are the pieces after it until one has no
    duplicate (a re-run of a file, or of its end after a crash).
    """

    def __init__(self, engine: Engine, *, threaded: bool = True, depth: int = 3) -> None:
        self.engine = engine
        self.accepted = 0
        self.error: BaseException | None = None
        self._postgres = is_postgres(engine)
        self._copy = self._postgres
        self._conn: Connection | None = None
        self._transaction: RootTransaction | None = None
        self._pending = 0
        self._queue: queue.Queue[tuple[list[TextRow], bool] | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="cadence-import-writer", daemon=True)
            self._thread.start()

    def _write(self, rows: list[TextRow], end: bool) -> None:
        if self._conn is None:
            self._conn = self.engine.connect()
            if not self._postgres:
                # Inserts land all over the indexes of a growing table: a page cache of 128 MiB
                # (the default is 2 MiB) saves re-reading their pages (1,000,000 events: 30 s of
                # CPU instead of 34, 2/3 of the wall time, measured).
                self._conn.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_IMPORT_CACHE_KIB}")
                self._conn.commit()
        conn = self._conn
        if self._transaction is None:
            self._transaction = conn.begin()
        if rows:
            if self._postgres:
                self._pending += self._write_postgres(conn, rows)
            else:
                self._pending += insert_text_rows(conn, rows)
        if end:
            self._transaction.commit()
            self._transaction = None
            self.accepted += self._pending
            self._pending = 0

    def _write_postgres(self, conn: Connection, rows: list[TextRow]) -> int:
        from psycopg.errors import UniqueViolation

        unique = _first_of_each(rows)
        if self._copy:
            savepoint = conn.begin_nested()
            try:
                accepted = copy_text_rows(conn, unique)
            except UniqueViolation:
                savepoint.rollback()  # some are stored already
            else:
                savepoint.commit()
                return accepted
        accepted = insert_text_rows(conn, unique)
        self._copy = accepted == len(unique)
        return accepted

    def _abort(self) -> None:
        """Roll back the open group (if any) and give the connection back."""
        try:
            if self._transaction is not None:
                self._transaction.rollback()
        finally:
            self._transaction = None
            self._pending = 0
            if self._conn is not None:
                self._conn.close()
                self._conn = None

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


def _first_of_each(rows: list[TextRow]) -> list[TextRow]:
    """``rows`` without repeated ``message_id``s, the first of each kept (as the log would).

    >>> [r[1] for r in _first_of_each([("m1", "a"), ("m2", "b"), ("m1", "c")])]  # type: ignore[list-item]
    ['a', 'b']
    """
    if len({row[0] for row in rows}) == len(rows):
        return rows
    seen: set[str] = set()
    return [row for row in rows if not (row[0] in seen or seen.add(row[0]))]  # type: ignore[func-returns-value]


def import_file(
    *,
    engine: Engine,
    path: Path,
    fmt: str | None = None,
    mapping: dict[str, str] | None = None,
    default_type: str = "track",
    rejects_path: Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    source: str = "import",
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import ``path`` (``.ndjson``/``.jsonl`` or ``.csv``, or as ``fmt`` says).

    :param batch_size: lines per group; each group's good lines are committed together.
    :param progress: called with the number of bytes read so far after each piece of a group.
    """
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "ndjson")
    if fmt not in ("csv", "ndjson"):
        raise ValueError(f"unknown format {fmt!r}: use csv or ndjson")
    report = ImportReport(rejects_path=rejects_path or path.with_name(path.name + ".rejects.ndjson"))
    rejects: IO[bytes] | None = None
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

    postgres = is_postgres(engine)
    loads = orjson.loads
    fast_options: dict[str, Any] = {"default_type": default_type, "received_ms": received, "source": source}

    def general(raw: bytes, parsed: Any) -> TextRow | None:
        """The general path: decode (NDJSON), validate, and the row; None for a blank line."""
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
                    row = general(raw, parsed)
                except EventError as exc:
                    reject(number, raw, exc)
                    continue
                if row is None:
                    blank += 1
                    continue
            good.append(row)
        report.lines += len(piece) - blank
        return good

    with path.open("rb") as handle:
        chunks = (
            _csv_chunks(handle, mapping or {}, default_type, batch_size)
            if fmt == "csv"
            else _ndjson_chunks(handle, batch_size)
        )
        writer = _Writer(engine)
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
    report.accepted = writer.accepted
    report.duplicates = report.lines - report.rejected - report.accepted
    if report.rejected == 0:
        report.rejects_path = None
    return report
