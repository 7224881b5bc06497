"""A scheduled push and API commits for the same customers: caps hold, and neither waits for the other's deciding.

The push decides each chunk outside the write lock (SQLite) and without row locks (PostgreSQL),
then writes under them briefly, re-deciding the customers whose sends changed meanwhile. These
tests put an API commit for one customer between the chunk's deciding and its writing, by
wrapping the ``decide`` the push calls: on the push's first decision for that customer, the
commit runs on another connection and commits.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import DBAPIError

from cadence.channels import CHANNELS
from cadence.clock import FixedClock
from cadence.engine.decisions_service import make_decision
from cadence.scheduler import push as push_module
from cadence.scheduler.seed import SeedCustomer
from cadence.store.driver import SQLiteWriteLock
from cadence.store.schema.core import identities
from cadence.store.schema.decisions import decisions
from tests.scheduler.conftest import MONDAY, Rules, customers, make_scheduler, runs, send_rows

HOUR = 3_600_000
DAY = 24 * HOUR
AT_9 = MONDAY + 8 * HOUR  # 09:00 Berlin

CAPPED = """
event opened = "Email Opened"
campaign daily "Daily digest" {
    audience count(opened within 30d) > 0
    send template "digest"
    channel email
    cap 1 per 7d
    schedule every day at 09:00 in "Europe/Berlin"
}
"""

Seed = Callable[[Sequence[SeedCustomer]], None]


def readers(n: int) -> list[SeedCustomer]:
    return customers(n, events={"Email Opened": [MONDAY - 2 * DAY]})


def decide_calls(monkeypatch: pytest.MonkeyPatch, customer_id: int, first: Callable[[], Any]) -> list[Any]:
    """Wrap the push's ``decide``: ``first()`` runs before its first decision for ``customer_id``.

    Returns the decisions the push made for that customer, in order.
    """
    decide = push_module.decide
    made: list[Any] = []

    def wrapped(**kw: Any) -> Any:
        if kw["profile"].customer_id == customer_id:
            if not made:
                first()
            made.append(decide(**kw))
            return made[-1]
        return decide(**kw)

    monkeypatch.setattr(push_module, "decide", wrapped)
    return made


def test_an_api_commit_landing_while_the_push_decides_keeps_the_cap(
    db_engine: Engine, seed: Seed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API commit for customer 7 commits after the push read 7's sends and before it writes.

    Exactly one send for 7 (the API's: the cap allows one a week); the push re-decided 7 from
    the sends it re-read under the lock, and queued the other 29. Before, on SQLite the commit
    waited for the chunk's write lock (here: timed out, after a second instead of 30 s); on
    PostgreSQL it committed and the push queued a second send.
    """
    seed(readers(30))
    with db_engine.begin() as conn:
        conn.execute(insert(identities).values(kind="user", value="u7", customer_id=7, first_seen_ms=MONDAY))
    rules = Rules(CAPPED)
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, rules, clock, chunk_size=10)
    scheduler.tick()  # registers the job
    clock.set(AT_9)
    sqlite = db_engine.dialect.name == "sqlite"
    if sqlite:  # a commit that waits for the push's lock fails after a second or two, not 30 s
        monkeypatch.setattr(SQLiteWriteLock.for_path(db_engine.url.database), "timeout", 1.0)
    committed: list[Any] = []

    def api_commit() -> None:
        with db_engine.connect() as conn:
            if sqlite:
                conn.connection.dbapi_connection.execute("PRAGMA busy_timeout = 1000")  # type: ignore[union-attr]
            try:
                with conn.begin():
                    committed.append(
                        make_decision(
                            conn=conn,
                            ruleset=rules.current,  # type: ignore[arg-type]
                            customer_ref="u7",
                            now_ms=AT_9,
                            available_channels=CHANNELS,
                            learners=None,
                            mode="commit",
                        )
                    )
            except Exception as exc:  # noqa: BLE001 - asserted below
                committed.append(exc)
            finally:
                if sqlite:
                    conn.connection.dbapi_connection.execute("PRAGMA busy_timeout = 30000")  # type: ignore[union-attr]

    made = decide_calls(monkeypatch, 7, api_commit)
    [report] = scheduler.tick()
    [body] = committed
    assert not isinstance(body, Exception), body
    assert body["action"] == "send" and body["queued"] is True
    rows = send_rows(db_engine)
    per_customer = Counter(r.customer_id for r in rows)
    assert per_customer[7] == 1, [r.idempotency_key for r in rows if r.customer_id == 7]
    [seven] = [r for r in rows if r.customer_id == 7]
    assert seven.decision_id == body["decision_id"]  # the API's send, not the push's
    assert set(per_customer) == set(range(1, 31)) and set(per_customer.values()) == {1}
    # The push decided 7 twice: from the snapshot (send), then from the sends re-read (capped).
    assert [d.action for d in made] == ["send", "none"]
    assert report.total_enqueued == 29 and report.evaluated == 30
    with db_engine.connect() as conn:
        recorded = set(conn.scalars(select(decisions.c.customer_id).where(decisions.c.id.like("push-%"))))
    assert recorded == set(range(1, 31)) - {7}
    [run] = runs(db_engine)
    assert (run.status, run.evaluated, run.enqueued) == ("done", 30, 29)


def test_another_writer_takes_the_sqlite_write_lock_while_the_push_decides(
    db_engine: Engine, seed: Seed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the push decides a chunk, a writer on another connection gets the lock at once."""
    if db_engine.dialect.name != "sqlite":
        pytest.skip("SQLite's write lock")
    seed(readers(30))
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, Rules(CAPPED), clock, chunk_size=10)
    scheduler.tick()
    clock.set(AT_9)
    took: list[Any] = []

    def other_writer() -> None:
        other = sqlite3.connect(db_engine.url.database, timeout=0.5, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("UPDATE profiles SET traits = traits WHERE customer_id = 25")
            other.execute("COMMIT")
            took.append(True)
        except sqlite3.OperationalError as exc:  # "database is locked": the push holds it
            took.append(exc)
        finally:
            other.close()

    decide_calls(monkeypatch, 15, other_writer)  # in the second chunk
    [report] = scheduler.tick()
    assert took == [True]
    assert report.total_enqueued == 30


class _Deadlock(Exception):
    sqlstate = "40P01"  # as psycopg's DeadlockDetected carries it


def test_a_chunk_whose_write_deadlocked_is_decided_again(
    db_engine: Engine, seed: Seed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL rolls back one side of a lock cycle: the push reads and decides the chunk again."""
    seed(readers(30))
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(db_engine, Rules(CAPPED), clock, chunk_size=10)
    scheduler.tick()
    clock.set(AT_9)
    recheck = push_module._recheck
    calls: list[int] = []

    def deadlock_once(conn: Any, customer_ids: Sequence[int], now_ms: int) -> Any:
        calls.append(customer_ids[0])
        if len(calls) == 2:  # the second chunk's first try
            raise DBAPIError("SELECT ... FOR UPDATE", None, _Deadlock("deadlock detected"))
        return recheck(conn, customer_ids, now_ms)

    monkeypatch.setattr(push_module, "_recheck", deadlock_once)
    [report] = scheduler.tick()
    assert calls == [1, 11, 11, 21]
    assert report.total_enqueued == 30 and report.evaluated == 30 and report.chunks == 3
    assert sorted(r.customer_id for r in send_rows(db_engine)) == list(range(1, 31))
    [run] = runs(db_engine)
    assert (run.status, run.evaluated, run.enqueued) == ("done", 30, 30)
