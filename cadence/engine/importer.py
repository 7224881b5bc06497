"""File imports: NDJSON of Segment-spec calls, or CSV with a column mapping.

Lines are read and validated in groups of ``batch_size``; each group's good lines are
appended in one transaction by a writer thread while the next group is parsed. Bad
lines are reported with their line number and reason and never stop the import. A
re-run of the same file appends nothing twice (``messageId``, or the content hash
of a line without one).
"""

from __future__ import annotations

import csv
import gc
import io
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import Engine

from cadence.clock import now_ms
from cadence.engine.events import NewEvent, parse_call
from cadence.engine.ingest import Row, event_rows, insert_rows
from cadence.errors import EventError
from cadence.store.db import is_postgres

__all__ = ["ImportReport", "import_file", "parse_mapping"]

#: SQLite page cache of the importing connection, in KiB (it stays with that pooled connection).
SQLITE_IMPORT_CACHE_KIB = 131_072

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
    """Lists of ``size`` (number, raw line, decoded JSON or its error); blank lines skipped."""
    loads = orjson.loads
    number = 0
    chunk: list[tuple[int, bytes, Any]] = []
    while True:
        lines = handle.readlines(1 << 20)  # whole lines, about 1 MiB: one read call
        if not lines:
            break
        for raw in lines:
            number += 1
            try:
                chunk.append((number, raw, loads(raw)))
            except orjson.JSONDecodeError as exc:
                if raw.strip():
                    chunk.append((number, raw, EventError(f"not valid JSON: {exc}", field="line")))
        while len(chunk) >= size:
            yield chunk[:size]
            chunk = chunk[size:]
    if chunk:
        yield chunk


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
    """Appends row groups, each in its own transaction; on a thread of its own when ``threaded``.

    On PostgreSQL the server does the inserting, so a writer thread that waits on it
    (psycopg releases the GIL) lets the next group be parsed meanwhile. On SQLite the
    inserting is done in this process; a second thread measured slower there (more CPU
    and more wall time on the shared 2-core machine), so the groups are written inline.
    At most ``depth`` groups wait, so memory stays bounded; an error stops the import at
    the next group.
    """

    def __init__(self, engine: Engine, *, threaded: bool, depth: int = 2) -> None:
        self.engine = engine
        self.accepted = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue[list[Row] | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="cadence-import-writer", daemon=True)
            self._thread.start()

    def _write(self, rows: list[Row]) -> None:
        with self.engine.begin() as conn:
            if self._thread is None and conn.dialect.name == "sqlite":
                # Inserts land all over the three indexes of a growing table: a page cache of
                # 128 MiB (the default is 2 MiB) saves re-reading their pages (1,000,000 events:
                # 30 s of CPU instead of 34, 2/3 of the wall time, measured).
                conn.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_IMPORT_CACHE_KIB}")
            self.accepted += insert_rows(conn, rows)

    def _run(self) -> None:
        while (rows := self._queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the reader stops at its next put
            try:
                self._write(rows)
            except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
                self.error = exc

    def put(self, rows: list[Row]) -> None:
        """Write ``rows``, or queue them (blocks while ``depth`` groups wait); re-raise a writer error."""
        if self._thread is None:
            self._write(rows)
            return
        if self.error is not None:
            raise self.error
        self._queue.put(rows)

    def close(self) -> None:
        """Wait until every queued group is committed; re-raise a writer error."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            if self.error is not None:
                raise self.error


def import_file(
    *,
    engine: Engine,
    path: Path,
    fmt: str | None = None,
    mapping: dict[str, str] | None = None,
    default_type: str = "track",
    rejects_path: Path | None = None,
    batch_size: int = 10_000,
    source: str = "import",
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import ``path`` (``.ndjson``/``.jsonl`` or ``.csv``, or as ``fmt`` says).

    :param batch_size: lines per group; each group's good lines are committed together.
    :param progress: called with the number of bytes read so far after each group.
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

    with path.open("rb") as handle:
        chunks = (
            _csv_chunks(handle, mapping or {}, default_type, batch_size)
            if fmt == "csv"
            else _ndjson_chunks(handle, batch_size)
        )
        writer = _Writer(engine, threaded=is_postgres(engine))
        collecting = gc.isenabled()
        # The groups are millions of short-lived, acyclic objects (decoded JSON): reference
        # counting frees them, and the cycle collector would only rescan them (about a third
        # of the CPU time of an import, measured). Cycles made meanwhile are collected after.
        gc.disable()
        try:
            for chunk in chunks:
                report.lines += len(chunk)
                good: list[NewEvent] = []
                for number, raw, parsed in chunk:
                    try:
                        if type(parsed) is dict:
                            if "type" not in parsed:
                                parsed["type"] = default_type
                        elif isinstance(parsed, EventError):
                            raise parsed
                        good.append(parse_call(parsed, received_ms=received, source=source))
                    except EventError as exc:
                        reject(number, raw, exc)
                if good:
                    writer.put(event_rows(good, received))
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
