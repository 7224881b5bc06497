"""File imports: NDJSON of Segment-spec calls, or CSV with a column mapping.

Lines are parsed and validated one by one; good ones are appended in batches, bad
ones are reported with their line number and reason and never stop the import. A
re-run of the same file appends nothing twice (``messageId``, or the content hash
of a line without one).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import Engine

from cadence.clock import now_ms
from cadence.engine.events import NewEvent, parse_call
from cadence.engine.ingest import record_events
from cadence.errors import EventError

__all__ = ["ImportReport", "import_file", "parse_mapping"]

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


def _ndjson_lines(handle: IO[bytes]) -> Iterator[tuple[int, bytes, Any]]:
    for number, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        try:
            yield number, raw, orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield number, raw, EventError(f"not valid JSON: {exc}", field="line")


def _csv_lines(
    handle: IO[bytes], mapping: dict[str, str], default_type: str
) -> Iterator[tuple[int, bytes, Any]]:
    text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
    try:
        reader = csv.DictReader(text)
        if reader.fieldnames is None:
            return
        missing = sorted(set(mapping) - set(reader.fieldnames))
        if missing:
            raise ValueError(f"--map names column(s) not in the CSV header: {', '.join(missing)}")
        for row in reader:
            raw = ",".join(f"{k}={v}" for k, v in row.items()).encode()
            if None in row:
                yield reader.line_num, raw, EventError("more cells than header columns", field="line")
                continue
            yield reader.line_num, raw, csv_row_to_call(row, mapping, default_type)
    finally:
        text.detach()  # the caller owns ``handle``: do not let the wrapper close it


def import_file(
    *,
    engine: Engine,
    path: Path,
    fmt: str | None = None,
    mapping: dict[str, str] | None = None,
    default_type: str = "track",
    rejects_path: Path | None = None,
    batch_size: int = 1000,
    source: str = "import",
    progress: Callable[[int], None] | None = None,
) -> ImportReport:
    """Import ``path`` (``.ndjson``/``.jsonl`` or ``.csv``, or as ``fmt`` says).

    :param progress: called with the number of bytes read so far after each batch.
    """
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "ndjson")
    if fmt not in ("csv", "ndjson"):
        raise ValueError(f"unknown format {fmt!r}: use csv or ndjson")
    report = ImportReport(rejects_path=rejects_path or path.with_name(path.name + ".rejects.ndjson"))
    rejects: IO[bytes] | None = None
    batch: list[NewEvent] = []
    received = now_ms()

    def flush() -> None:
        if batch:
            result = record_events(engine=engine, batch=batch)
            report.accepted += result.accepted
            report.duplicates += result.duplicates
            batch.clear()

    with path.open("rb") as handle:
        lines = _csv_lines(handle, mapping or {}, default_type) if fmt == "csv" else _ndjson_lines(handle)
        try:
            for number, raw, parsed in lines:
                report.lines += 1
                try:
                    if isinstance(parsed, EventError):
                        raise parsed
                    if isinstance(parsed, dict) and "type" not in parsed:
                        parsed = {**parsed, "type": default_type}
                    batch.append(parse_call(parsed, received_ms=received, source=source))
                except EventError as exc:
                    report.rejected += 1
                    key = exc.field or "line"
                    report.reasons[key] = report.reasons.get(key, 0) + 1
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
                if len(batch) >= batch_size:
                    flush()
                    if progress is not None:
                        progress(handle.tell())
            flush()
            if progress is not None:
                progress(handle.tell())
        finally:
            if rejects is not None:
                rejects.close()
    if report.rejected == 0:
        report.rejects_path = None
    return report
