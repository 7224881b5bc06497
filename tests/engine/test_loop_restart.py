"""A batch is one transaction with its checkpoints: a crash or a write the database refuses rolls
it back, and a restart ends in the state of an uninterrupted run."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from sqlalchemy import Connection, Engine, func, select

from cadence.engine.consent import ConsentSubscriber
from cadence.engine.events import LoggedEvent
from cadence.engine.loop import EngineLoop
from cadence.engine.profiles import ProfilesSubscriber
from cadence.runtime import Runtime
from cadence.store.fast import write_rows
from cadence.store.schema.core import checkpoints, consent, customers, events, identities, profiles
from tests.engine.test_loop import Crashing, ingest, snapshot, stream

_CUSTOMER_COLUMNS = (("id", "bigint"), ("created_ms", "bigint"))


def test_a_crash_after_a_batch_wrote_restarts_to_the_uninterrupted_state(
    runtime: Runtime, db_engine: Engine
) -> None:
    ingest(runtime, *stream())
    # The crashing subscriber runs after profiles: that batch's profile rows are written first.
    crashing = Crashing(fail_on=30)
    loop = EngineLoop(runtime, [ProfilesSubscriber(runtime), ConsentSubscriber(), crashing], batch_size=10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.catch_up()
    applied = loop.positions()["profiles"]
    assert applied < 30
    with db_engine.connect() as conn:  # nothing of the failed batch was committed
        assert conn.scalar(select(func.sum(profiles.c.event_count))) == conn.scalar(
            select(func.count()).where(events.c.id <= applied)
        )
    crashing.fail_on = -1
    EngineLoop(
        runtime, [ProfilesSubscriber(runtime), ConsentSubscriber(), crashing], batch_size=10
    ).catch_up()
    restarted = snapshot(runtime.engine)

    with db_engine.begin() as conn:  # the same log from scratch, uninterrupted
        for table in ("profile_daily", "profile_event_stats", "profiles"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
        for table in (consent, identities, checkpoints):
            conn.execute(table.delete())
        conn.execute(customers.update().values(merged_into=None))
        conn.execute(customers.delete())
    crashing.seen.clear()
    EngineLoop(
        runtime, [ProfilesSubscriber(runtime), ConsentSubscriber(), crashing], batch_size=10
    ).catch_up()
    assert snapshot(runtime.engine) == restarted


class _BadWrite:
    """Writes a duplicate key through the loop's bulk path, like a write the server refuses."""

    name = "bad-write"

    def __init__(self) -> None:
        self.fail = True

    def start(self, conn: Connection, checkpoint: int) -> int:
        return checkpoint

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        if self.fail:
            write_rows(conn, "customers", _CUSTOMER_COLUMNS, [(10**9, 0), (10**9, 0)])

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        pass

    def erased(self, conn: Connection, customer_id: int) -> None:
        pass


def test_a_refused_bulk_write_fails_and_rolls_back_its_batch(runtime: Runtime, db_engine: Engine) -> None:
    ingest(runtime, *stream()[:20])
    bad = _BadWrite()
    loop = EngineLoop(runtime, [ProfilesSubscriber(runtime), bad])
    with pytest.raises(Exception, match="(?i)unique|duplicate") as raised:
        loop.run_once()
    assert "simulated" not in str(raised.value)
    assert loop.positions()["profiles"] == 0
    with db_engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(profiles)) == 0
        assert conn.scalar(select(func.count()).select_from(identities)) == 0
    bad.fail = False  # the connection went back to the pool healthy: the next batch commits
    assert loop.run_once() == 20
    with db_engine.connect() as conn:
        assert conn.scalar(select(func.sum(profiles.c.event_count))) == 20
