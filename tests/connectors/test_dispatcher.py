"""The dispatcher on a real database against the fake providers: consent, batching, failures, restarts."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, insert, select, text, update

from cadence.clock import FixedClock
from cadence.connectors.delivery import Dispatcher, DispatchReport, InDoubtReport
from cadence.connectors.testing import FakeProviders, connector_config
from cadence.engine.sendqueue import enqueue_send
from cadence.plugins.manager import ConnectorRegistry, build_connectors, make_plugin_manager
from cadence.settings import Settings
from cadence.store.schema.connectors import connector_state
from cadence.store.schema.core import consent, customers, events, identities, profiles
from cadence.store.schema.sends import sends


def registry(
    fake: FakeProviders, http: httpx.AsyncClient, engine: Engine, **extra: dict[str, Any]
) -> ConnectorRegistry:
    """Connectors as the app builds them: SendGrid and Twilio configured, the rest via the outbox."""
    configured = {
        name: {**connector_config(name, fake.base_url), **extra.get(name, {})} for name in ("sendgrid", "sms")
    }
    settings = Settings(disable_plugin_autoload=True, connectors=configured, _env_file=None)  # type: ignore[call-arg]
    return build_connectors(settings, pm=make_plugin_manager(settings), engine=engine, client=http)


def seed(engine: Engine, n: int, *, email: bool = True, sms_consent: bool | None = None) -> list[int]:
    """``n`` customers with a user id and traits (and optionally an SMS consent row)."""
    with engine.begin() as conn:
        first = conn.execute(insert(customers).values(created_ms=0)).inserted_primary_key[0]
        if n > 1:
            conn.execute(insert(customers), [{"created_ms": 0}] * (n - 1))
        ids = list(range(int(first), int(first) + n))
        conn.execute(
            insert(identities),
            [{"kind": "user", "value": f"u{c}", "customer_id": c, "first_seen_ms": 0} for c in ids],
        )
        traits = [{"email": f"c{c}@example.com"} if email else {} for c in ids]
        for t, c in zip(traits, ids, strict=True):
            t["phone"] = f"+1415{c:07d}"
        conn.execute(
            insert(profiles),
            [
                {
                    "customer_id": c,
                    "first_seen_ms": 0,
                    "last_seen_ms": 0,
                    "event_count": 1,
                    "traits": t,
                    "updated_event_id": 0,
                    "trait_events": {},
                }
                for c, t in zip(ids, traits, strict=True)
            ],
        )
        if sms_consent is not None:
            conn.execute(
                insert(consent),
                [
                    {
                        "customer_id": c,
                        "channel": "sms",
                        "granted": sms_consent,
                        "source": "test",
                        "changed_ms": 0,
                        "event_id": 0,
                    }
                    for c in ids
                ],
            )
    return ids


def enqueue(engine: Engine, ids: list[int], channel: str = "email", template: str = "d-abc") -> None:
    with engine.begin() as conn:
        for c in ids:
            enqueue_send(
                conn,
                key=f"spring:{c}:1",
                campaign="spring",
                customer_id=c,
                channel=channel,
                due_ms=0,
                now_ms=0,
                template=template,
                decision_id=f"dec-{c}",
            )


def dispatched(engine: Engine) -> int:
    """The messages the campaigns page counts as sent by the dispatcher (every day, campaign and channel)."""
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT COALESCE(SUM(dispatched), 0) FROM campaign_daily")).scalar_one())


def statuses(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(select(sends.c.status, func.count()).group_by(sends.c.status)).all())


async def until_statuses(engine: Engine, expected: dict[str, int]) -> None:
    while statuses(engine) != expected:
        await asyncio.sleep(0.01)


async def test_batches_of_1000_per_request(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    ids = seed(sqlite_engine, 2500)
    enqueue(sqlite_engine, ids)
    dispatcher = Dispatcher(
        engine=sqlite_engine, route=registry(fake, http, sqlite_engine).route, batch_limit=5000
    )
    report = await dispatcher.drain()
    assert report.sent == 2500 and statuses(sqlite_engine) == {"sent": 2500}
    sizes = sorted(len(c.body["personalizations"]) for c in fake.calls_to("sendgrid"))
    assert sizes == [500, 1000, 1000]
    assert set(fake.delivered.values()) == {1} and len(fake.delivered) == 2500


async def test_opted_out_customers_are_never_sent_to(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    out, fine = seed(sqlite_engine, 2)
    with sqlite_engine.begin() as conn:
        conn.execute(
            insert(consent).values(
                customer_id=out, channel="email", granted=False, source="webhook", changed_ms=1, event_id=1
            )
        )
    enqueue(sqlite_engine, [out, fine])
    report = await Dispatcher(engine=sqlite_engine, route=registry(fake, http, sqlite_engine).route).drain()
    assert (report.sent, report.suppressed) == (1, 1)
    assert list(fake.delivered) == [f"spring:{fine}:1"]


async def test_sms_needs_an_explicit_opt_in(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    unknown = seed(sqlite_engine, 2)
    granted = seed(sqlite_engine, 1, sms_consent=True)
    enqueue(sqlite_engine, unknown + granted, channel="sms", template="Hello")
    report = await Dispatcher(engine=sqlite_engine, route=registry(fake, http, sqlite_engine).route).drain()
    assert (report.sent, report.suppressed) == (1, 2)
    assert [c.body["To"] for c in fake.calls_to("twilio")] == [f"+1415{granted[0]:07d}"]


async def test_missing_required_trait_is_dead_lettered(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    ids = seed(sqlite_engine, 1, email=False)
    enqueue(sqlite_engine, ids)
    await Dispatcher(engine=sqlite_engine, route=registry(fake, http, sqlite_engine).route).drain()
    with sqlite_engine.connect() as conn:
        status, error = conn.execute(select(sends.c.status, sends.c.last_error)).one()
    assert status == "failed" and "no email trait" in error and fake.calls == []


async def test_permanent_failure_is_dead_lettered_with_the_providers_words(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    ids = seed(sqlite_engine, 3)
    enqueue(sqlite_engine, ids)
    fake.fail_next(
        "sendgrid", 400, {"errors": [{"field": "template_id", "message": "The template_id must be valid"}]}
    )
    report = await Dispatcher(engine=sqlite_engine, route=registry(fake, http, sqlite_engine).route).drain()
    assert report.failed == 3 and len(fake.calls_to("sendgrid")) == 1
    with sqlite_engine.connect() as conn:
        errors = set(conn.scalars(select(sends.c.last_error)))
    [error] = errors
    assert "PermanentFailure" in error and "The template_id must be valid" in error


async def test_twilio_stop_becomes_an_unsubscribe_event(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    [cid] = seed(sqlite_engine, 1, sms_consent=True)
    fake.twilio_opted_out.add(f"+1415{cid:07d}")
    enqueue(sqlite_engine, [cid], channel="sms", template="Hello")
    report = await Dispatcher(engine=sqlite_engine, route=registry(fake, http, sqlite_engine).route).drain()
    assert report.opted_out == 1 and report.failed == 1
    with sqlite_engine.connect() as conn:
        row = conn.execute(select(events.c.event, events.c.user_id, events.c.payload)).one()
    assert row.event == "Unsubscribed" and row.user_id == f"u{cid}"
    assert row.payload["properties"]["channel"] == "sms"


async def test_circuit_opens_on_repeated_failures_and_resumes(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    ids = seed(sqlite_engine, 4)
    enqueue(sqlite_engine, ids)
    tight = {
        "batch_size": 1,
        "concurrency": 1,
        "max_attempts": 1,
        "circuit_failure_threshold": 2,
        "circuit_reset_seconds": 0.3,
        "backoff_base_seconds": 0.01,
    }
    connectors = registry(fake, http, sqlite_engine, sendgrid=tight)
    for _ in range(2):
        fake.fail_next("sendgrid", 503, {"errors": [{"message": "service unavailable"}]})
    dispatcher = Dispatcher(engine=sqlite_engine, route=connectors.route)
    first = await dispatcher.dispatch_once()
    assert first.sent == 0 and first.deferred == 4
    assert len(fake.calls_to("sendgrid")) == 2  # the other two batches never reached the provider
    with sqlite_engine.connect() as conn:
        assert conn.scalar(select(connector_state.c.circuit)) == "open"
    await asyncio.sleep(0.45)
    await dispatcher.drain()
    assert statuses(sqlite_engine) == {"sent": 4}
    with sqlite_engine.connect() as conn:
        assert conn.scalar(select(connector_state.c.circuit)) == "closed"
        assert set(conn.scalars(select(sends.c.attempts))) <= {1, 2}


async def test_restart_mid_push_delivers_everything_exactly_once(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    ids = seed(sqlite_engine, 3000)
    enqueue(sqlite_engine, ids)
    connectors = registry(fake, http, sqlite_engine, sendgrid={"batch_size": 100})
    fake.latency = 0.005  # a provider that takes a moment, so the stop lands mid-push
    first = Dispatcher(engine=sqlite_engine, route=connectors.route, batch_limit=300)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop=stop, poll_seconds=0.01))
    while sum(fake.delivered.values()) < 600:
        await asyncio.sleep(0.005)
    task.cancel()  # the process is told to stop in the middle of the push
    with pytest.raises(asyncio.CancelledError):
        await task
    partial = statuses(sqlite_engine)
    assert 0 < partial.get("sent", 0) < 3000 and "sending" not in partial
    second = Dispatcher(engine=sqlite_engine, route=connectors.route, batch_limit=300)
    assert await second.recover_in_doubt() == InDoubtReport()
    await second.drain()
    assert statuses(sqlite_engine) == {"sent": 3000}
    assert len(fake.delivered) == 3000 and set(fake.delivered.values()) == {1}
    assert dispatched(sqlite_engine) == 3000  # each counted once, by the transaction that recorded it


async def test_rows_left_sending_by_a_crash_are_settled_without_duplicates(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    ids = seed(db_engine, 4)
    enqueue(db_engine, ids[:2])
    enqueue(db_engine, ids[2:], channel="push")
    with db_engine.begin() as conn:
        conn.execute(
            update(sends)
            .where(sends.c.channel == "email")
            .values(status="sending", connector="sendgrid", updated_ms=0)
        )
        conn.execute(
            update(sends)
            .where(sends.c.channel == "push")
            .values(status="sending", connector="outbox", updated_ms=0)
        )
    connectors = registry(fake, http, db_engine)
    dispatcher = Dispatcher(engine=db_engine, route=connectors.route)
    assert await dispatcher.recover_in_doubt() == InDoubtReport(requeued=2, dead_lettered=2)
    with db_engine.connect() as conn:
        rows = dict(conn.execute(select(sends.c.channel, sends.c.status)).all())
        errors = set(conn.scalars(select(sends.c.last_error).where(sends.c.status == "failed")))
    assert rows == {"email": "failed", "push": "queued"}
    assert errors and all(e.startswith("in_doubt:") and "sendgrid" in e for e in errors)
    # A second pass finds nothing: every row was settled once.
    assert await dispatcher.recover_in_doubt() == InDoubtReport()


async def test_rows_within_their_lease_are_left_alone(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    ids = seed(sqlite_engine, 1)
    enqueue(sqlite_engine, ids)
    now = Dispatcher(engine=sqlite_engine, route=lambda c, n: None).clock.now_ms()
    with sqlite_engine.begin() as conn:  # another dispatcher is sending it right now
        conn.execute(update(sends).values(status="sending", connector="sendgrid", updated_ms=now))
    dispatcher = Dispatcher(engine=sqlite_engine, route=registry(fake, http, sqlite_engine).route)
    assert await dispatcher.recover_in_doubt() == InDoubtReport()
    assert statuses(sqlite_engine) == {"sending": 1}


async def test_in_doubt_sms_are_looked_up_at_twilio(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    ids = seed(db_engine, 3, sms_consent=True)
    enqueue(db_engine, ids, channel="sms", template="Hello {first_name}")
    connectors = registry(fake, http, db_engine)
    sms = connectors.get("sms")
    assert sms is not None
    # Twilio accepted the first message before the crash; the other two never arrived.
    first = Dispatcher(engine=db_engine, route=connectors.route, batch_limit=1)
    await first.dispatch_once()
    sid = fake.twilio_messages[0]["sid"]
    with db_engine.begin() as conn:
        conn.execute(
            update(sends).values(status="sending", connector="sms", updated_ms=1, provider_message_id=None)
        )
        conn.execute(
            text("UPDATE campaign_daily SET dispatched = 0")
        )  # (its record, count included, never happened)
    dispatcher = Dispatcher(engine=db_engine, route=connectors.route)
    assert await dispatcher.recover_in_doubt() == InDoubtReport(requeued=2, confirmed_sent=1)
    assert dispatched(db_engine) == 1  # the one Twilio had, confirmed
    lookups = [c for c in fake.calls_to("twilio") if c.method == "GET"]
    assert len(lookups) == 3
    await dispatcher.drain()
    assert statuses(db_engine) == {"sent": 3}
    with db_engine.connect() as conn:
        assert conn.scalar(select(sends.c.provider_message_id).where(sends.c.customer_id == ids[0])) == sid
    assert set(fake.delivered.values()) == {1} and len(fake.delivered) == 3
    assert dispatched(db_engine) == 3


async def test_two_dispatchers_never_take_the_same_row(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    ids = seed(db_engine, 1200)
    enqueue(db_engine, ids)
    connectors = registry(fake, http, db_engine, sendgrid={"batch_size": 50})
    a = Dispatcher(engine=db_engine, route=connectors.route, batch_limit=100)
    b = Dispatcher(engine=db_engine, route=connectors.route, batch_limit=100)
    ra, rb = await asyncio.gather(a.drain(), b.drain())
    assert ra.sent + rb.sent == 1200 and ra.sent > 0 and rb.sent > 0
    assert len(fake.delivered) == 1200 and set(fake.delivered.values()) == {1}
    assert statuses(db_engine) == {"sent": 1200}


async def test_a_running_dispatcher_batches_sends_that_fall_due_while_it_works(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    # A round that took less than a full batch emptied the queue: the next one waits the poll
    # interval, so sends queued meanwhile go out together, not in a round each.
    ids = seed(db_engine, 8)
    enqueue(db_engine, ids[:3])
    rounds: list[int] = []
    connectors = registry(fake, http, db_engine)
    dispatcher = Dispatcher(
        engine=db_engine,
        route=connectors.route,
        parallel_rounds=1,
        before_round=lambda: rounds.append(len(fake.delivered)),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop=stop, poll_seconds=30))
    await asyncio.wait_for(until_statuses(db_engine, {"sent": 3}), 10)
    enqueue(db_engine, ids[3:])  # due now, queued while the dispatcher runs
    await asyncio.sleep(0.3)
    stop.set()
    report = await asyncio.wait_for(task, 10)
    assert (report.claimed, report.sent, rounds) == (3, 3, [0])
    assert statuses(db_engine) == {"sent": 3, "queued": 5}
    assert await dispatcher.drain() == DispatchReport(claimed=5, sent=5)  # one round takes them all


async def test_a_running_dispatcher_works_a_backlog_down_without_waiting(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    ids = seed(db_engine, 5)
    enqueue(db_engine, ids)
    connectors = registry(fake, http, db_engine)
    dispatcher = Dispatcher(engine=db_engine, route=connectors.route, batch_limit=2, parallel_rounds=1)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop=stop, poll_seconds=30))
    # Full batches of 2, 2, then 1: no poll wait between them (a wait would take 30 s each).
    await asyncio.wait_for(until_statuses(db_engine, {"sent": 5}), 10)
    stop.set()
    report = await asyncio.wait_for(task, 10)
    assert (report.claimed, report.sent) == (5, 5)


async def test_unconfigured_channels_go_to_the_outbox(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    ids = seed(sqlite_engine, 2)
    enqueue(sqlite_engine, ids, channel="push")
    connectors = registry(fake, http, sqlite_engine)
    assert connectors.route("push") is connectors.get("outbox")
    assert connectors.route("email") is connectors.get("sendgrid")
    report = await Dispatcher(engine=sqlite_engine, route=connectors.route).drain()
    assert report.sent == 2 and fake.calls == []
    with sqlite_engine.connect() as conn:
        assert set(conn.scalars(select(sends.c.connector))) == {"outbox"}


async def test_settings_from_the_environment_are_understood(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {
        **connector_config("sendgrid", fake.base_url),
        "sandbox_mode": "false",
        "categories": "spring, promo",
        "max_attempts": "2",
    }.items():
        monkeypatch.setenv(f"CADENCE_CONNECTORS__SENDGRID__{key.upper()}", str(value))
    monkeypatch.setenv("CADENCE_CONNECTORS__SMS__ENABLED", "false")
    settings = Settings(disable_plugin_autoload=True, _env_file=None)  # type: ignore[call-arg]
    connectors = build_connectors(
        settings, pm=make_plugin_manager(settings), engine=sqlite_engine, client=http
    )
    assert connectors.route("sms") is connectors.get("outbox")  # "false" from the environment disables
    ids = seed(sqlite_engine, 1)
    enqueue(sqlite_engine, ids)
    await Dispatcher(engine=sqlite_engine, route=connectors.route).drain()
    [call] = fake.calls_to("sendgrid")
    assert "mail_settings" not in call.body and call.body["categories"] == ["spring", "promo"]
    assert statuses(sqlite_engine) == {"sent": 1}


async def test_outbox_also_writes_json_lines_once_per_send(
    http: httpx.AsyncClient, sqlite_engine: Engine, tmp_path: Any
) -> None:
    path = tmp_path / "out" / "sends.jsonl"
    settings = Settings(
        disable_plugin_autoload=True, connectors={"outbox": {"jsonl_path": str(path)}}, _env_file=None
    )  # type: ignore[call-arg]
    connectors = build_connectors(
        settings, pm=make_plugin_manager(settings), engine=sqlite_engine, client=http
    )
    ids = seed(sqlite_engine, 3)
    enqueue(sqlite_engine, ids, channel="push")
    outbox_connector = connectors.get("outbox")
    assert outbox_connector is not None
    await Dispatcher(engine=sqlite_engine, route=connectors.route).drain()
    with sqlite_engine.begin() as conn:  # a crash left the rows in doubt; the outbox may safely resend
        conn.execute(update(sends).values(status="sending", updated_ms=0))
    dispatcher = Dispatcher(engine=sqlite_engine, route=connectors.route)
    assert await dispatcher.recover_in_doubt() == InDoubtReport(requeued=3)
    await dispatcher.drain()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(line["idempotency_key"] for line in lines) == sorted(f"spring:{c}:1" for c in ids)
    assert lines[0]["channel"] == "push" and lines[0]["campaign"] == "spring"


async def test_a_round_with_nothing_due_leaves_the_sqlite_write_lock_alone(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle dispatcher's claims are reads: every decision commit waits for a write transaction."""
    from cadence.store.driver import SQLiteWriteLock

    ids = seed(sqlite_engine, 2)
    dispatcher = Dispatcher(engine=sqlite_engine, route=registry(fake, http, sqlite_engine).route)
    taken: list[str] = []
    acquire = SQLiteWriteLock.acquire

    def counted(self: SQLiteWriteLock) -> bool:
        taken.append(self.path)
        return acquire(self)

    monkeypatch.setattr(SQLiteWriteLock, "acquire", counted)
    report = await dispatcher.dispatch_once()
    assert report.claimed == 0 and taken == []
    monkeypatch.setattr(SQLiteWriteLock, "acquire", acquire)
    enqueue(sqlite_engine, ids)  # now something is due: the round claims it under the lock, as before
    monkeypatch.setattr(SQLiteWriteLock, "acquire", counted)
    report = await dispatcher.dispatch_once()
    assert (report.claimed, report.sent) == (2, 2) and taken
    assert statuses(sqlite_engine) == {"sent": 2}


def _writer(engine: Engine) -> sqlite3.Connection:
    """A connection of its own that fails at once when another holds SQLite's write lock."""
    assert engine.url.database
    return sqlite3.connect(engine.url.database, timeout=0, isolation_level=None, check_same_thread=False)


async def test_a_claim_reads_and_prepares_its_rows_without_the_sqlite_write_lock(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    """While a claim routes its rows (reading traits, consent, building the messages), others can write.

    Before, the whole claim held the write lock, in a thread that waits for the interpreter
    lock between rows: every decision commit waited for it.
    """
    ids = seed(sqlite_engine, 3)
    enqueue(sqlite_engine, ids)
    route = registry(fake, http, sqlite_engine).route
    writer = _writer(sqlite_engine)
    wrote: list[str] = []

    def routing(channel: str, name: str | None) -> Any:
        writer.execute("BEGIN IMMEDIATE")  # raises "database is locked" if the claim held it
        writer.execute("ROLLBACK")
        wrote.append(channel)
        return route(channel, name)

    report = await Dispatcher(engine=sqlite_engine, route=routing).drain()
    writer.close()
    assert report.sent == 3 and len(wrote) >= 3
    assert statuses(sqlite_engine) == {"sent": 3}


async def test_a_row_that_changed_after_the_claims_read_is_claimed_from_what_is_there_now(
    fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    """A send expired between the claim's snapshot and its write is not sent; nothing else is lost."""
    ids = seed(sqlite_engine, 3)
    enqueue(sqlite_engine, ids)
    route = registry(fake, http, sqlite_engine).route
    writer = _writer(sqlite_engine)
    gone = ids[1]

    def routing(channel: str, name: str | None) -> Any:
        if not writer.execute("SELECT 1 FROM sends WHERE status = 'expired'").fetchall():
            writer.execute(
                "UPDATE sends SET status = 'expired', last_error = 'ended', updated_ms = 5 WHERE customer_id = ?",
                (gone,),
            )
        return route(channel, name)

    report = await Dispatcher(engine=sqlite_engine, route=routing).drain()
    writer.close()
    assert report.sent == 2
    assert statuses(sqlite_engine) == {"sent": 2, "expired": 1}
    assert sorted(fake.delivered) == sorted(f"spring:{c}:1" for c in ids if c != gone)
    with sqlite_engine.connect() as conn:
        attempts = dict(conn.execute(select(sends.c.customer_id, sends.c.attempts)).all())
    assert attempts == {ids[0]: 1, gone: 0, ids[2]: 1}


@pytest.mark.parametrize("statement", ["_MARK_FINALS_SQLITE", "_MARK_CLAIMED_SQLITE", "_RECORD_SQLITE"])
def test_the_sqlite_marks_find_each_row_by_its_key(sqlite_engine: Engine, statement: str) -> None:
    """Through the status index every queued row would be joined to the whole array: a 100,000-row
    queue made one claim take minutes."""
    from cadence.connectors import delivery

    sql = getattr(delivery, statement) + (delivery._VERSION_GUARD if "MARK" in statement else "")
    with sqlite_engine.connect() as conn:
        plan = [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, (0, "[]"))]
    assert any("sends USING INTEGER PRIMARY KEY" in step for step in plan), plan
    assert not any("ix_sends_status" in step for step in plan), plan


async def until_delivered(fake: FakeProviders, count: int) -> None:
    """Wait for the fake to finish the requests our client gave up on (it answers them late)."""
    for _ in range(500):
        if sum(fake.delivered.values()) >= count:
            return
        await asyncio.sleep(0.01)


async def test_a_timed_out_sendgrid_request_is_not_sent_again(fake: FakeProviders, db_engine: Engine) -> None:
    # The provider got the request but answered after our timeout: SendGrid has no idempotency
    # key, so sending again would mail everyone twice (before: once per retry, up to 32 times).
    ids = seed(db_engine, 3)
    enqueue(db_engine, ids)
    clock = FixedClock(int(time.time() * 1000))
    async with httpx.AsyncClient(timeout=0.2) as slow_client:
        connectors = registry(fake, slow_client, db_engine, sendgrid={"backoff_base_seconds": 0.01})
        dispatcher = Dispatcher(engine=db_engine, route=connectors.route, clock=clock)
        fake.latency = 0.5
        report = await dispatcher.drain()
        await until_delivered(fake, 3)
        fake.latency = 0.0
        assert (report.sent, report.in_doubt) == (0, 3)
        assert len(fake.calls_to("sendgrid")) == 1
        assert statuses(db_engine) == {"sending": 3}  # in doubt, as after a crash
        assert (await dispatcher.drain()).claimed == 0
        # Once the lease has run out, SendGrid's in-doubt policy applies: dead-letter for an operator.
        clock.advance(dispatcher.lease_ms + 1)
        assert await dispatcher.recover_in_doubt() == InDoubtReport(dead_lettered=3)
        await dispatcher.drain()
    assert statuses(db_engine) == {"failed": 3}
    with db_engine.connect() as conn:
        assert all(e.startswith("in_doubt:") for e in conn.scalars(select(sends.c.last_error)))
    assert set(fake.delivered.values()) == {1} and len(fake.delivered) == 3


async def test_a_timed_out_twilio_request_is_looked_up_not_sent_again(
    fake: FakeProviders, db_engine: Engine
) -> None:
    ids = seed(db_engine, 1, sms_consent=True)
    enqueue(db_engine, ids, channel="sms", template="Hello")
    clock = FixedClock(int(time.time() * 1000))
    async with httpx.AsyncClient(timeout=0.2) as slow_client:
        connectors = registry(fake, slow_client, db_engine)
        dispatcher = Dispatcher(engine=db_engine, route=connectors.route, clock=clock)
        fake.latency = 0.5
        assert (await dispatcher.drain()).in_doubt == 1
        await until_delivered(fake, 1)
        fake.latency = 0.0
        clock.advance(dispatcher.lease_ms + 1)
        assert await dispatcher.recover_in_doubt() == InDoubtReport(confirmed_sent=1)
        await dispatcher.drain()
    assert statuses(db_engine) == {"sent": 1}
    with db_engine.connect() as conn:
        assert conn.scalar(select(sends.c.provider_message_id)) == fake.twilio_messages[0]["sid"]
    assert list(fake.delivered.values()) == [1]


async def test_a_refused_connection_is_retried_later(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    # Nothing reached the provider: sending again is safe for every connector.
    ids = seed(db_engine, 1)
    enqueue(db_engine, ids)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    connectors = registry(
        fake,
        http,
        db_engine,
        sendgrid={"base_url": f"http://127.0.0.1:{port}", "max_attempts": 1, "backoff_base_seconds": 0.01},
    )
    report = await Dispatcher(engine=db_engine, route=connectors.route).dispatch_once()
    assert (report.deferred, report.in_doubt) == (1, 0)
    assert statuses(db_engine) == {"queued": 1}


async def test_a_connector_missing_a_setting_says_which_and_pauses(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    ids = seed(db_engine, 2)
    enqueue(db_engine, ids[:1])
    connectors = registry(fake, http, db_engine, sendgrid={"api_key": ""})
    sendgrid = connectors.get("sendgrid")
    assert sendgrid is not None and sendgrid.missing_settings() == ["CADENCE_CONNECTORS__SENDGRID__API_KEY"]
    dispatcher = Dispatcher(engine=db_engine, route=connectors.route)
    assert (await dispatcher.dispatch_once()).failed == 1
    with db_engine.connect() as conn:
        error = conn.scalar(select(sends.c.last_error))
    # The setting, in the operator's words; not "connector bug".
    assert error == "ConfigError: CADENCE_CONNECTORS__SENDGRID__API_KEY: required by the sendgrid connector"
    # Like bad credentials, it will not fix itself: the connector is paused, the next sends wait.
    assert dispatcher.deliverer_for(sendgrid).breaker.state == "open"  # type: ignore[union-attr]
    with db_engine.begin() as conn:
        enqueue_send(
            conn, key="later", campaign="spring", customer_id=ids[1], channel="email", due_ms=0, now_ms=0
        )
    report = await dispatcher.dispatch_once()
    assert (report.failed, report.deferred) == (0, 1)
    assert fake.calls_to("sendgrid") == []


async def test_an_opted_out_customer_is_still_removed_from_an_ad_audience(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    # The audience sync queues a removal because the customer opted out; suppressing it for
    # that same opt-out (as a message would be) left them in the platform's audience for good.
    settings = Settings(
        disable_plugin_autoload=True,
        connectors={"facebook": connector_config("facebook", fake.base_url)},
        _env_file=None,  # type: ignore[call-arg]
    )
    connectors = build_connectors(settings, pm=make_plugin_manager(settings), engine=db_engine, client=http)
    [cid] = seed(db_engine, 1)
    with db_engine.begin() as conn:
        conn.execute(
            insert(consent).values(
                customer_id=cid, channel="all", granted=False, source="test", changed_ms=0, event_id=0
            )
        )
        for op in ("add", "remove"):
            enqueue_send(
                conn,
                key=f"lapsed:{cid}:1:{op}",
                campaign="lapsed",
                customer_id=cid,
                channel="facebook",
                due_ms=0,
                now_ms=0,
                variables={"audience_id": "1200", "operation": op},
            )
    report = await Dispatcher(engine=db_engine, route=connectors.route).drain()
    assert (report.sent, report.suppressed) == (1, 1)
    with db_engine.connect() as conn:
        done = dict(conn.execute(select(sends.c.idempotency_key, sends.c.status)).all())
    assert done == {f"lapsed:{cid}:1:add": "suppressed", f"lapsed:{cid}:1:remove": "sent"}
    assert [c.method for c in fake.calls_to("facebook")] == ["DELETE"]


async def test_one_bad_address_does_not_dead_letter_the_whole_sendgrid_batch(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    # SendGrid refuses a whole request for one invalid address, naming it (personalizations.N.to):
    # that one is dead-lettered with SendGrid's words, the others go out in the next round.
    ids = seed(db_engine, 3)
    with db_engine.begin() as conn:
        conn.execute(
            update(profiles).where(profiles.c.customer_id == ids[1]).values(traits={"email": "nobody"})
        )
    enqueue(db_engine, ids)
    dispatcher = Dispatcher(engine=db_engine, route=registry(fake, http, db_engine).route)
    first = await dispatcher.dispatch_once()
    assert (first.sent, first.failed, first.deferred) == (0, 1, 2)
    with db_engine.begin() as conn:  # the retry is due in a second: make it due now
        conn.execute(update(sends).where(sends.c.status == "queued").values(next_attempt_ms=None))
    await dispatcher.drain()
    with db_engine.connect() as conn:
        rows = dict(conn.execute(select(sends.c.customer_id, sends.c.status)).all())
        error = conn.scalar(select(sends.c.last_error).where(sends.c.status == "failed"))
    assert rows == {ids[0]: "sent", ids[1]: "failed", ids[2]: "sent"}
    assert error is not None and "Does not contain a valid address" in error
    assert sorted(fake.delivered) == [f"spring:{ids[0]}:1", f"spring:{ids[2]}:1"]
