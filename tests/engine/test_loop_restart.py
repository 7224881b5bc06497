"""A batch is one transaction with its checkpoints: a crash or a write the database refuses rolls
it back, and a restart ends in the state of an uninterrupted run."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from cadence.engine.consent import ConsentSubscriber
from cadence.engine.loop import EngineLoop
from cadence.engine.profiles import ProfilesSubscriber
from cadence.runtime import Runtime, open_runtime
from cadence.store.schema.core import events, identities, profiles
from tests.engine.test_loop import Crashing, RefusedWrite, forget_derived_state, ingest, snapshot, stream


def retrying(runtime: Runtime, *, poll: float, quarantine_after: int) -> Runtime:
    """``runtime`` with a background loop that polls every ``poll`` s and sets an event aside after
    ``quarantine_after`` failed tries of its batch (0: never)."""
    update = {"engine_poll_seconds": poll, "engine_quarantine_after": quarantine_after}
    return open_runtime(runtime.settings.model_copy(update=update), engine=runtime.engine)


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

    forget_derived_state(db_engine)  # the same log from scratch, uninterrupted
    crashing.seen.clear()
    EngineLoop(
        runtime, [ProfilesSubscriber(runtime), ConsentSubscriber(), crashing], batch_size=10
    ).catch_up()
    assert snapshot(runtime.engine) == restarted


def test_a_refused_bulk_write_fails_and_rolls_back_its_batch(runtime: Runtime, db_engine: Engine) -> None:
    ingest(runtime, *stream()[:20])
    bad = RefusedWrite()
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


def test_a_drained_log_is_looked_at_without_the_sqlite_write_lock(
    runtime: Runtime, db_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looking at a log with nothing new is a read: every decision commit waits for SQLite's write lock."""
    if db_engine.dialect.name != "sqlite":
        pytest.skip("SQLite's write lock")
    from cadence.store.driver import SQLiteWriteLock

    calls = stream()
    ingest(runtime, *calls[:20])
    loop = EngineLoop(runtime, [ProfilesSubscriber(runtime), ConsentSubscriber()], batch_size=10)
    assert loop.catch_up() == 20
    taken: list[object] = []
    acquire = SQLiteWriteLock.acquire

    def counted(self: SQLiteWriteLock) -> bool:
        taken.append(self)
        return acquire(self)

    monkeypatch.setattr(SQLiteWriteLock, "acquire", counted)
    assert loop.run_once() == 0 and taken == []
    ingest(runtime, *calls[20:30])
    taken.clear()
    assert loop.run_once() == 10 and taken  # a batch writes under the lock, as before
    # Another process's loop applies the next events; this one finds them applied (its positions
    # follow the stored checkpoints) without taking the lock.
    ingest(runtime, *calls[30:40])
    EngineLoop(runtime, [ProfilesSubscriber(runtime), ConsentSubscriber()], batch_size=10).catch_up()
    taken.clear()
    assert loop.run_once() == 0 and taken == []
    assert loop.positions()["profiles"] == loop.positions()["identity"] == 40
    with db_engine.connect() as conn:
        assert conn.scalar(select(func.sum(profiles.c.event_count))) == 40


def test_a_batch_that_keeps_failing_is_reported_retried_with_a_pause_and_recovers(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber failing on one event stops the log there (nothing after it is applied out of
    order): the background loop reports it (``failing`` in the status, the error in a fresh wait's
    message), logs the traceback once, retries with a growing pause, and clears it once it commits."""
    import time

    from cadence.engine.loop import EngineBehindError

    quick = retrying(runtime, poll=0.02, quarantine_after=0)
    ingest(quick, *stream()[:20])
    crashing = Crashing(fail_on=12)
    loop = EngineLoop(quick, [ProfilesSubscriber(quick), crashing], batch_size=5)
    loop.start()
    try:
        deadline = time.monotonic() + 20
        while (loop.failure is None or loop.failure.attempts < 3) and time.monotonic() < deadline:
            time.sleep(0.02)
        failing = loop.status()["failing"]
        assert failing is not None and failing["error"] == "RuntimeError: simulated crash"
        assert failing["after_event"] == 10 and failing["attempts"] >= 3
        assert (
            loop.failure is not None and loop.failure.next_attempt_s - time.monotonic() > 0.02
        )  # backing off
        tracebacks = [
            r for r in caplog.records if r.exc_info is not None and "after event 10" in r.getMessage()
        ]
        assert len(tracebacks) == 1
        with pytest.raises(EngineBehindError, match="its batches are failing: RuntimeError: simulated crash"):
            loop.wait_applied(timeout=0.2)
        crashing.fail_on = -1
        loop.wait_applied(timeout=20)  # the next try commits, however long the pause had grown
        assert loop.status()["failing"] is None and max(crashing.seen) == 20
    finally:
        loop.stop()


def test_an_event_no_batch_gets_past_is_set_aside_and_the_loop_goes_on(
    runtime: Runtime, db_engine: Engine
) -> None:
    """After ``engine_quarantine_after`` failed tries the loop applies the batch's events one by one,
    sets aside the one that fails for the subscriber it fails in (the others apply it), and goes on;
    ``retry`` applies it again once the cause is gone."""
    quick = retrying(runtime, poll=0.02, quarantine_after=2)
    ingest(quick, *stream()[:20])
    crashing = Crashing(fail_on=12)
    loop = EngineLoop(quick, [ProfilesSubscriber(quick), crashing], batch_size=5)
    loop.start()
    try:
        loop.wait_applied(timeout=30)
        status = loop.status()
    finally:
        loop.stop()
    assert status["failing"] is None
    assert status["quarantined"]["count"] == 1
    (aside,) = status["quarantined"]["recent"]
    assert (aside["event_id"], aside["subscriber"], aside["error"]) == (
        12,
        "crashing",
        "RuntimeError: simulated crash",
    )
    assert sorted(crashing.seen) == [i for i in range(1, 21) if i != 12]
    with db_engine.connect() as conn:  # profiles applied every event, the set-aside one included
        assert conn.scalar(select(func.sum(profiles.c.event_count))) == 20
    crashing.fail_on = -1
    assert EngineLoop(quick, [ProfilesSubscriber(quick), crashing], batch_size=5).retry(12) == ["crashing"]
    assert sorted(crashing.seen) == list(range(1, 21))
    with db_engine.connect() as conn:
        assert conn.scalar(select(func.sum(profiles.c.event_count))) == 20  # not applied twice
    assert EngineLoop(quick, [crashing]).status()["quarantined"]["count"] == 0


def test_erasing_a_customer_removes_their_set_aside_events(runtime: Runtime, db_engine: Engine) -> None:
    from cadence.engine.privacy import erase_customer

    ingest(runtime, *stream()[:20])
    loop = EngineLoop(runtime, [ProfilesSubscriber(runtime), Crashing(fail_on=12)], batch_size=5)
    with pytest.raises(RuntimeError):
        loop.catch_up()
    assert loop.set_aside_failing() == 12
    with db_engine.connect() as conn:
        owner = conn.execute(select(events.c.user_id, events.c.anonymous_id).where(events.c.id == 12)).one()
    erase_customer(runtime=runtime, ref=owner.user_id or owner.anonymous_id, requested_by="test", loop=loop)
    assert loop.status()["quarantined"]["count"] == 0


def test_a_database_error_never_sets_an_event_aside(runtime: Runtime) -> None:
    import time

    import sqlalchemy.exc

    class Locked(Crashing):
        def apply(self, conn: Any, batch: Any) -> None:
            if any(e.id == self.fail_on for e in batch):
                raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("database is locked"))
            super().apply(conn, batch)

    quick = retrying(runtime, poll=0.01, quarantine_after=1)
    ingest(quick, *stream()[:10])
    locked = Locked(fail_on=7)
    loop = EngineLoop(quick, [locked], batch_size=5)
    loop.start()
    try:
        deadline = time.monotonic() + 20
        while (loop.failure is None or loop.failure.attempts < 3) and time.monotonic() < deadline:
            time.sleep(0.01)
        status = loop.status()
    finally:
        loop.stop()
    assert status["failing"] is not None and status["quarantined"]["count"] == 0
    assert max(locked.seen) == 5  # stopped before the failing batch, nothing skipped


class InMemoryCrashing(Crashing):
    """:class:`Crashing` whose state lives in memory, as the learners' does (its position is its own)."""

    name = "memory"
    in_memory = True

    def start(self, conn: Any, checkpoint: int) -> int:
        return max(self.seen, default=0)


def test_a_follower_applies_the_log_to_its_in_memory_state_reading_only(
    runtime: Runtime, db_engine: Engine
) -> None:
    """A process whose loop does not lead applies the leader's applied events to its in-memory
    subscribers, without the event the leader set aside for them, and writes nothing."""
    ingest(runtime, *stream()[:10])
    leader = EngineLoop(runtime, [ProfilesSubscriber(runtime), InMemoryCrashing(fail_on=4)], batch_size=5)
    with pytest.raises(RuntimeError):
        leader.catch_up()
    assert leader.set_aside_failing() == 4
    leader.catch_up()
    with db_engine.connect() as conn:
        counted = conn.scalar(select(func.sum(profiles.c.event_count)))
    follower_memory = InMemoryCrashing(fail_on=4)
    follower = EngineLoop(runtime, [ProfilesSubscriber(runtime), follower_memory], batch_size=3)
    assert follower.follow_in_memory() == 10
    assert follower_memory.seen == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert follower.follow_in_memory() == 0
    with db_engine.connect() as conn:
        assert conn.scalar(select(func.sum(profiles.c.event_count))) == counted
    ingest(runtime, *stream()[10:12])  # logged, not applied by the leader yet: not followed
    assert follower.follow_in_memory() == 0
