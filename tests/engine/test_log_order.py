"""The engine loop never skips an event: ids that commit out of order are waited for.

On PostgreSQL ids are drawn when rows are inserted and become visible at commit, in any
order across transactions; the loop must not move its checkpoint past an id that a
transaction still in flight may commit (the import's two connections and its reserved
ids included). On SQLite writers are serialised, so the concurrent test runs there too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Connection, Engine, select

from cadence.engine.events import LoggedEvent, parse_call
from cadence.engine.importer import PIECE_LINES, _PgWriters, import_file
from cadence.engine.ingest import PG_EVENT_ID_SEQUENCE, TextRow, append_events, record_events
from cadence.engine.loop import EngineLoop
from cadence.runtime import Runtime
from cadence.store.db import is_postgres
from cadence.store.schema.core import events

T0 = 1_767_225_600_000


class Recorder:
    """A subscriber that keeps the id of every event it is given, in the order given."""

    name = "recorder"

    def __init__(self) -> None:
        self.ids: list[int] = []

    def start(self, conn: Connection, checkpoint: int) -> int:
        return checkpoint

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        self.ids.extend(e.id for e in batch)

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        pass

    def erased(self, conn: Connection, customer_id: int) -> None:
        pass


def call(message_id: str, user: str = "u1") -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Viewed",
        "userId": user,
        "messageId": message_id,
        "timestamp": T0 / 1000,
    }


def stored_ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(select(events.c.id).order_by(events.c.id)))


def postgres_only(engine: Engine) -> None:
    if not is_postgres(engine):
        pytest.skip("SQLite serialises writers (BEGIN IMMEDIATE): a second one cannot start meanwhile")


def test_an_id_committed_after_a_higher_one_is_not_skipped(runtime: Runtime) -> None:
    postgres_only(runtime.engine)
    recorder = Recorder()
    loop = EngineLoop(runtime, [recorder])
    with runtime.engine.connect() as early:
        transaction = early.begin()
        append_events(early, [parse_call(call("first"), received_ms=T0)])  # the lower id, in flight
        record_events(engine=runtime.engine, batch=[parse_call(call("second"), received_ms=T0)])
        assert loop.run_once() == 0  # "second" is visible, but "first" may still commit below it
        transaction.commit()
    assert loop.catch_up() == 2
    assert recorder.ids == stored_ids(runtime.engine) and len(recorder.ids) == 2


def test_ids_an_import_has_reserved_hold_the_loop_until_their_group_commits(runtime: Runtime) -> None:
    postgres_only(runtime.engine)
    recorder = Recorder()
    loop = EngineLoop(runtime, [recorder])
    writers = _PgWriters(runtime.engine)
    try:
        rows: list[TextRow] = [
            (f"i{k}", "track", "Viewed", "u1", None, T0, T0, "import", orjson.dumps({"k": k}).decode())
            for k in range(5)
        ]
        writers.put(rows, end=False)  # ids reserved, the group's transaction open
        record_events(engine=runtime.engine, batch=[parse_call(call("http"), received_ms=T0)])
        assert loop.run_once() == 0
        writers.put(rows[:0], end=True)
    finally:
        writers.close()
    assert writers.accepted == 5
    assert loop.catch_up() == 6
    with runtime.engine.connect() as conn:
        order = list(conn.scalars(select(events.c.message_id).order_by(events.c.id)))
    assert order == [f"i{k}" for k in range(5)] + ["http"]  # the reserved ids are below the later append
    assert recorder.ids == stored_ids(runtime.engine)


def test_the_loop_running_during_an_import_and_appends_sees_every_event_once_in_order(
    runtime: Runtime, tmp_path: Path
) -> None:
    n = 3 * PIECE_LINES // 2
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"".join(orjson.dumps(call(f"f{k}", f"u{k % 50}")) + b"\n" for k in range(n)))
    recorder = Recorder()
    loop = EngineLoop(runtime, [recorder], batch_size=500)
    stop = threading.Event()
    failures: list[BaseException] = []

    def keep_running(work: Any) -> None:
        try:
            while not stop.is_set():
                work()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    appended = iter(range(1_000_000))

    def append() -> None:
        k = next(appended)
        record_events(engine=runtime.engine, batch=[parse_call(call(f"h{k}", "u1"), received_ms=T0)])

    threads = [threading.Thread(target=keep_running, args=(w,)) for w in (loop.run_once, append)]
    for thread in threads:
        thread.start()
    try:
        report = import_file(engine=runtime.engine, path=path, batch_size=700)  # many groups, both writers
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures
    assert report.accepted == n
    loop.catch_up()
    ids = stored_ids(runtime.engine)
    assert len(ids) > n
    assert recorder.ids == ids  # every event, once, in id order


def test_the_announced_bounds_read_the_sequence_behind_event_ids(db_engine: Engine) -> None:
    postgres_only(db_engine)
    with db_engine.connect() as conn:
        sequence = conn.exec_driver_sql("SELECT pg_get_serial_sequence('events', 'id')").scalar_one()
        cache = conn.exec_driver_sql(
            "SELECT seqcache FROM pg_sequence WHERE seqrelid = %s::regclass", (sequence,)
        ).scalar_one()
    # A cache above 1 would let a session draw ids below the sequence's last value later.
    assert (sequence, cache) == (f"public.{PG_EVENT_ID_SEQUENCE}", 1)
