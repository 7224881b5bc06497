"""The import's fast paths: the typed decode agrees with ``parse_call``, COPY keeps idempotency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, func, select

from cadence.engine.events import parse_call
from cadence.engine.fastcall import text_rows
from cadence.engine.importer import PIECE_LINES, import_file
from cadence.errors import EventError
from cadence.store.db import is_postgres
from cadence.store.schema.core import events

RECEIVED = 1_767_225_600_000
BASE: dict[str, Any] = {"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m1"}

# Lines the fast path takes, and lines it must leave to parse_call (which accepts or rejects them).
LINES: list[bytes] = [
    orjson.dumps(BASE),
    orjson.dumps({**BASE, "properties": {"revenue": 12.5, "sku": "A"}, "context": {"ip": "1.2.3.4"}}),
    orjson.dumps({**BASE, "context": {}, "integrations": {"All": False}, "properties": None}),
    orjson.dumps({**BASE, "timestamp": "2026-01-02T03:04:05.678+02:00", "channel": "server"}),
    orjson.dumps({**BASE, "originalTimestamp": "2026-01-01T00:00:00Z", "sentAt": "2026-01-01T00:00:10Z"}),
    orjson.dumps({**BASE, "timestamp": "2026-01-01T00:00:00", "sentAt": "2026-01-01T00:00:03Z"}),
    orjson.dumps({**BASE, "originalTimestamp": "", "timestamp": "2026-01-01T00:00:00Z"}),
    orjson.dumps({"type": "identify", "anonymousId": "a1", "messageId": "m2", "traits": {"plan": "gold"}}),
    orjson.dumps({"type": "identify", "userId": "u1", "messageId": "m3", "context": {"traits": {"x": 1}}}),
    orjson.dumps({"type": "page", "userId": "u1", "messageId": "m4", "name": "Home", "category": "Docs"}),
    orjson.dumps({"type": "screen", "userId": "u1", "messageId": "m5", "category": None, "properties": {}}),
    orjson.dumps({"event": "No Type", "userId": "u1", "messageId": "m6"}),  # the default type
    b'{ "type" : "track" , "event" : "Spaced", "userId":"u1", "messageId":"m7",\t"properties" : { "a" : [1, 2] } }',
    json.dumps({**BASE, "properties": {"name": "Zoë 😀", "esc": "tab\there"}}, ensure_ascii=False).encode(),
    json.dumps({**BASE, "properties": {"name": "Zoë"}}).encode(),  # \u escapes
    b'{"type":"track","event":"Big","userId":"u1","messageId":"m8","properties":{"n":18446744073709551616}}',
    # Left to the general path:
    b'{"type":"track","event":"Huge","userId":"u1","messageId":"m9","properties":{"n":1e400}}',
    b'{"type":"track","event":"Huge","userId":"u1","messageId":"m9","ignored":-2.5E+999}',
    b'{"type":"track","event":"Long","userId":"u1","messageId":"m9","properties":{"n":' + b"9" * 400 + b"}}",
    b'{"type":"track","event":"Nul","userId":"u1","messageId":"m10","properties":{"s":"a\\u0000b"}}',
    b'{"type":"track","event":"Bad utf-8","userId":"u1","messageId":"m11","properties":{"s":"\xff"}}',
    b'{"type":"track","event":"Surrogate","userId":"u1","messageId":"m11","properties":{"s":"\\ud800"}}',
    b'{"type":"track","event":"Dup","userId":"u1","userId":5,"messageId":"m12"}',
    orjson.dumps({**BASE, "userId": 42}),
    orjson.dumps({**BASE, "userId": "", "anonymousId": "a1"}),
    orjson.dumps({**BASE, "messageId": ""}),
    orjson.dumps({k: v for k, v in BASE.items() if k != "messageId"}),
    orjson.dumps({**BASE, "type": None}),
    orjson.dumps({**BASE, "type": "alias", "previousId": "a1"}),
    orjson.dumps({**BASE, "type": "group", "groupId": "g1"}),
    orjson.dumps({**BASE, "type": "follow"}),
    orjson.dumps({**BASE, "event": "   "}),
    orjson.dumps({**BASE, "event": 5}),
    orjson.dumps({**BASE, "event": "x" * 201}),
    orjson.dumps({**BASE, "context": []}),
    orjson.dumps({**BASE, "context": "x"}),
    orjson.dumps({**BASE, "integrations": 0}),
    orjson.dumps({**BASE, "properties": ["a"]}),
    orjson.dumps({**BASE, "timestamp": " 2026-01-01T00:00:00Z "}),
    orjson.dumps({**BASE, "timestamp": "yesterday"}),
    orjson.dumps({**BASE, "timestamp": 1767225600.5}),
    orjson.dumps({"type": "page", "userId": "u1", "messageId": "m13", "name": "n" * 201}),
    orjson.dumps({"type": "page", "userId": "u1", "messageId": "m13", "name": 7}),
    orjson.dumps({"userId": "u1"}),
    orjson.dumps(["not", "an", "object"]),
    b"{broken",
]


def general(line: bytes, received: int = RECEIVED) -> tuple[Any, ...] | str:
    """What the general path makes of ``line``: the row (payload decoded), or the error's field."""
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "error: line"
    if type(raw) is dict and "type" not in raw:
        raw["type"] = "track"
    try:
        e = parse_call(raw, received_ms=received, source="import")
    except EventError as exc:
        return f"error: {exc.field}"
    return (e.message_id, e.type, e.event, e.user_id, e.anonymous_id, e.ts_ms, received, "import", e.payload)


def test_the_fast_path_decides_as_parse_call_or_leaves_the_line_to_it() -> None:
    rows = text_rows(LINES, default_type="track", received_ms=RECEIVED, source="import")
    taken = 0
    for line, row in zip(LINES, rows, strict=True):
        if row is None:
            continue
        taken += 1
        # A taken line is one the general path accepts, with the same columns and payload.
        assert (*row[:8], orjson.loads(row[8])) == general(line), line
    assert taken == 16  # the common shapes above the "left to the general path" mark
    assert rows[15] is not None and '"n":18446744073709551616' in rows[15][8]  # kept exactly


def test_lines_left_to_the_general_path_are_rejected_with_its_field(
    tmp_path: Path, db_engine: Engine
) -> None:
    path = tmp_path / "mixed.ndjson"
    path.write_bytes(b"\n".join(LINES) + b"\n\n")
    report = import_file(engine=db_engine, path=path, batch_size=7)
    expected = {n: general(line) for n, line in enumerate(LINES, 1)}
    if is_postgres(db_engine):  # PostgreSQL cannot store NUL in text: that line is rejected too
        expected[20] = "error: properties.s"
    rejects = {r["line"]: r for r in map(orjson.loads, report.rejects_path.read_bytes().splitlines())}  # type: ignore[union-attr]
    assert {n: f"error: {r['field']}" for n, r in rejects.items()} == {
        n: v for n, v in expected.items() if isinstance(v, str)
    }
    assert "not valid JSON" in rejects[len(LINES)]["error"]
    assert "longer than 200" in rejects[42]["error"]
    assert report.lines == len(LINES)  # the blank line is not one
    unique = {v[0] for v in expected.values() if not isinstance(v, str)}
    assert (report.accepted, report.rejected) == (len(unique), len(rejects))
    with db_engine.connect() as conn:
        stored = {r.message_id: r for r in conn.execute(select(events))}
    received = stored["m2"].ts_ms  # no time given: the import's receive time; skew corrections use it
    first = {}
    for n, line in enumerate(LINES, 1):
        value = general(line, received)
        if not isinstance(value, str) and not isinstance(expected[n], str):
            first.setdefault(value[0], value)
    assert {
        m: (r.type, r.event, r.user_id, r.anonymous_id, r.ts_ms, r.payload) for m, r in stored.items()
    } == {m: (v[1], v[2], v[3], v[4], v[5], v[8]) for m, v in first.items()}


def stored_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(events.c.message_id).order_by(events.c.id)))


def write_lines(path: Path, ids: list[str]) -> None:
    path.write_bytes(b"".join(orjson.dumps({**BASE, "messageId": m}) + b"\n" for m in ids))


def test_groups_with_duplicates_inside_or_against_the_log_store_each_message_once(
    tmp_path: Path, db_engine: Engine
) -> None:
    # On PostgreSQL group 1 goes in by COPY (its repeat dropped before), group 2 meets a stored
    # message and is inserted with ON CONFLICT, so is group 3 (it has a stored one too), and
    # group 4, with none, by COPY again; on SQLite every group by INSERT ... ON CONFLICT.
    first = tmp_path / "first.ndjson"
    write_lines(first, ["s1", "s2"])
    import_file(engine=db_engine, path=first)
    ids = ["n1", "n2", "n1", "n3"] + ["n4", "s1", "n5", "n6"] + ["n7", "s2", "n4", "n8"] + ["n9", "n10"]
    path = tmp_path / "more.ndjson"
    write_lines(path, ids)
    report = import_file(engine=db_engine, path=path, batch_size=4)
    assert (report.lines, report.accepted, report.duplicates) == (14, 10, 4)
    assert stored_ids(db_engine) == ["s1", "s2"] + [f"n{i}" for i in range(1, 11)]
    again = import_file(engine=db_engine, path=path, batch_size=4)
    assert (again.accepted, again.duplicates) == (0, 14)
    assert len(stored_ids(db_engine)) == 12


def test_a_group_written_in_pieces_keeps_order_and_skips_repeats_across_pieces(
    tmp_path: Path, db_engine: Engine
) -> None:
    # One group (the default batch size) of three pieces: the second piece repeats a message
    # of the first (on PostgreSQL its COPY fails and only that piece is written again, by
    # INSERT ... ON CONFLICT, under the group's transaction), the third one stored before.
    first = tmp_path / "first.ndjson"
    write_lines(first, ["stored"])
    import_file(engine=db_engine, path=first)
    n = 2 * PIECE_LINES + 10
    ids = [f"p{i}" for i in range(n)]
    ids[PIECE_LINES + 5] = "p3"
    ids[-1] = "stored"
    path = tmp_path / "pieces.ndjson"
    write_lines(path, ids)
    report = import_file(engine=db_engine, path=path)
    assert (report.lines, report.accepted, report.duplicates) == (n, n - 2, 2)
    expected = ["stored"] + [m for i, m in enumerate(ids) if i not in (PIECE_LINES + 5, n - 1)]
    assert stored_ids(db_engine) == expected


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(events)) or 0)


def test_sigkill_mid_import_then_again_loses_nothing_and_stores_nothing_twice(
    tmp_path: Path, db_engine: Engine
) -> None:
    n = 60_000
    path = tmp_path / "big.ndjson"
    write_lines(path, [f"k{i}" for i in range(n)])
    url = db_engine.url.render_as_string(hide_password=False)
    command = [
        sys.executable,
        "-m",
        "cadence",
        "--database-url",
        url,
        "import",
        str(path),
        "--batch-size",
        "500",  # many small commits: the kill lands mid-import even on a fast or busy machine
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while count(db_engine) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    partial = count(db_engine)
    assert 0 < partial < n and partial % 500 == 0  # whole groups, each committed on its own
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    assert stored_ids(db_engine) == [f"k{i}" for i in range(n)]
