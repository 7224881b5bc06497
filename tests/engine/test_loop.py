"""The engine loop: identity stitching, profiles, consent, checkpoints and crash safety."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select

from cadence.engine.consent import consent_of, may_send
from cadence.engine.events import LoggedEvent, parse_call
from cadence.engine.identity import identities_of, resolve_customer
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop
from cadence.engine.profiles import load_profile
from cadence.runtime import Runtime
from cadence.store.fast import write_rows
from cadence.store.schema.core import (
    checkpoints,
    consent,
    customers,
    events,
    identities,
    profile_daily,
    profile_event_stats,
    profiles,
)

DAY = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def ev(n: int, kind: str = "track", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "messageId": f"m{n}", "timestamp": (T0 + n * 60_000) / 1000, **fields}


def ingest(runtime: Runtime, *calls: dict[str, Any]) -> None:
    batch = [parse_call(c, received_ms=T0) for c in calls]
    record_events(engine=runtime.engine, batch=batch)


def snapshot(engine: Engine) -> dict[str, Any]:
    """Every derived table, keyed by the identities of each customer (ids may differ)."""
    with engine.connect() as conn:
        names = {}
        for cid in conn.scalars(select(customers.c.id).where(customers.c.merged_into.is_(None))):
            names[cid] = tuple(identities_of(conn, cid))
        prof = {
            names[r.customer_id]: (r.first_seen_ms, r.last_seen_ms, r.event_count, r.traits, r.timezone)
            for r in conn.execute(select(profiles))
        }
        stats = sorted(
            (names[r.customer_id], r.event, r.count, r.sum_value, r.first_ms, r.last_ms)
            for r in conn.execute(select(profile_event_stats))
        )
        daily = sorted(
            (names[r.customer_id], r.event, r.day, r.count, r.sum_value)
            for r in conn.execute(select(profile_daily))
        )
        cons = {names[c]: consent_of(conn, c) for c in names}
    return {"profiles": prof, "stats": stats, "daily": daily, "consent": cons}


def customer(runtime: Runtime, ref: str) -> int:
    with runtime.engine.connect() as conn:
        cid = resolve_customer(conn, ref)
    assert cid is not None, ref
    return cid


def test_anonymous_history_follows_the_person_after_identify(runtime: Runtime) -> None:
    ingest(
        runtime,
        ev(1, event="Product Viewed", anonymousId="a1"),
        ev(2, event="Product Viewed", anonymousId="a1"),
        ev(
            3,
            "identify",
            userId="u1",
            anonymousId="a1",
            traits={"email": "x@example.com", "timezone": "Europe/Berlin"},
        ),
        ev(4, event="Order Completed", userId="u1", properties={"revenue": 80}),
    )
    EngineLoop(runtime).catch_up()
    assert customer(runtime, "a1") == customer(runtime, "u1")
    with runtime.engine.connect() as conn:
        p = load_profile(conn, customer(runtime, "u1"), now_ms=T0 + DAY)
    assert p.count("Product Viewed", T0 - DAY, T0 + DAY) == 2
    assert p.sum("Order Completed", "revenue", T0, T0 + DAY) == 80
    assert p.timezone == "Europe/Berlin" and p.traits["email"] == "x@example.com"


def test_late_link_merges_two_existing_customers(runtime: Runtime) -> None:
    loop = EngineLoop(runtime)
    ingest(runtime, ev(1, event="Signed Up", userId="u1"), ev(2, event="Product Viewed", anonymousId="a9"))
    loop.catch_up()
    assert customer(runtime, "u1") != customer(runtime, "a9")
    ingest(runtime, ev(3, "alias", userId="u1", previousId="a9"))
    loop.catch_up()
    merged = customer(runtime, "a9")
    assert merged == customer(runtime, "u1")
    with runtime.engine.connect() as conn:
        p = load_profile(conn, merged, now_ms=T0 + DAY)
        assert sorted(p.stats) == ["Product Viewed", "Signed Up"]
        assert conn.scalar(select(profiles.c.event_count).where(profiles.c.customer_id == merged)) == 3


def test_shared_device_never_merges_two_known_people(runtime: Runtime) -> None:
    ingest(
        runtime,
        ev(1, "identify", userId="alice", anonymousId="device"),
        ev(2, "identify", userId="bob", anonymousId="device"),
    )
    EngineLoop(runtime).catch_up()
    assert customer(runtime, "alice") != customer(runtime, "bob")
    assert customer(runtime, "device") == customer(runtime, "alice")


def test_consent_from_traits_events_and_unsubscribes(runtime: Runtime) -> None:
    ingest(
        runtime,
        ev(1, "identify", userId="u1", traits={"consent": {"email": True, "sms": True}}),
        ev(2, event="Unsubscribed", userId="u1", properties={"channel": "sms"}),
        ev(3, event="Email Bounced", userId="u1"),
    )
    EngineLoop(runtime).catch_up()
    cid = customer(runtime, "u1")
    with runtime.engine.connect() as conn:
        assert may_send(conn, cid, "sms") is False
        assert may_send(conn, cid, "email") is False
        assert consent_of(conn, cid)["email"]["source"] == "bounce:api"
    ingest(runtime, ev(4, "identify", userId="u1", traits={"email": "new@example.com"}))
    EngineLoop(runtime).catch_up()
    with runtime.engine.connect() as conn:
        assert may_send(conn, cid, "email") is True
        assert may_send(conn, cid, "sms") is False


def test_an_unsubscribe_whose_channel_is_not_a_name_refuses_every_channel(runtime: Runtime) -> None:
    """A channel of another type is read as no channel (the API's answer warns), so the customer's
    refusal holds everywhere, not for a channel named "['sms']" that nothing sends on."""
    ingest(
        runtime,
        ev(1, "identify", userId="u1", traits={"consent": {"email": True, "sms": True}}),
        ev(2, event="Unsubscribed", userId="u1", properties={"channel": ["sms"]}),
    )
    EngineLoop(runtime).catch_up()
    cid = customer(runtime, "u1")
    with runtime.engine.connect() as conn:
        assert may_send(conn, cid, "sms") is False and may_send(conn, cid, "email") is False
        assert set(consent_of(conn, cid)) == {"all", "email", "sms"}


def stream() -> list[dict[str, Any]]:
    calls = []
    for i in range(60):
        user, anon = f"u{i % 7}", f"a{i % 11}"
        if i % 9 == 0:
            calls.append(
                ev(
                    i,
                    "identify",
                    userId=user,
                    anonymousId=anon,
                    traits={"plan": f"p{i}", "timezone": ("Europe/Berlin", "Asia/Tokyo")[i % 2]},
                )
            )
        elif i % 13 == 0:
            calls.append(ev(i, "alias", userId=user, previousId=f"a{(i + 3) % 11}"))
        elif i % 5 == 0:
            calls.append(ev(i, event="Unsubscribed", userId=user, properties={"channel": "email"}))
        else:
            calls.append(ev(i, event=f"E{i % 3}", anonymousId=anon, properties={"value": i}))
    return calls


def test_batches_of_any_size_give_the_same_state(runtime: Runtime, db_engine: Engine) -> None:
    ingest(runtime, *stream())
    EngineLoop(runtime, batch_size=1000).catch_up()
    whole = snapshot(runtime.engine)
    with db_engine.begin() as conn:
        for table in (profile_daily, profile_event_stats, profiles):
            conn.execute(table.delete())
    # The same log replayed from scratch in small batches must give identical state.
    from cadence.store.schema.core import checkpoints, consent, identities

    with db_engine.begin() as conn:
        for table in (consent, identities, checkpoints):
            conn.execute(table.delete())
        conn.execute(customers.update().values(merged_into=None))
        conn.execute(customers.delete())
    EngineLoop(runtime, batch_size=7).catch_up()
    assert snapshot(runtime.engine) == whole


class Crashing:
    """A subscriber that fails on a chosen event id, like a process dying mid-batch."""

    name = "crashing"

    def __init__(self, fail_on: int) -> None:
        self.fail_on = fail_on
        self.seen: list[int] = []

    def start(self, conn: Connection, checkpoint: int) -> int:
        return checkpoint

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        for e in batch:
            if e.id == self.fail_on:
                raise RuntimeError("simulated crash")
        self.seen.extend(e.id for e in batch)

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        pass

    def erased(self, conn: Connection, customer_id: int) -> None:
        pass


class RefusedWrite:
    """Writes a duplicate key through the loop's bulk path while ``fail`` is set: a write the server refuses."""

    name = "refused-write"

    def __init__(self, *, fail: bool = True) -> None:
        self.fail = fail

    def start(self, conn: Connection, checkpoint: int) -> int:
        return checkpoint

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        if self.fail:
            write_rows(
                conn, "customers", (("id", "bigint"), ("created_ms", "bigint")), [(10**9, 0), (10**9, 0)]
            )

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        pass

    def erased(self, conn: Connection, customer_id: int) -> None:
        pass


def forget_derived_state(engine: Engine) -> None:
    """Delete every state the loop derives from the log: the next loop replays it from scratch."""
    with engine.begin() as conn:
        for table in ("profile_daily", "profile_event_stats", "profiles"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
        for table in (consent, identities, checkpoints):
            conn.execute(table.delete())
        conn.execute(customers.update().values(merged_into=None))
        conn.execute(customers.delete())


def test_crash_mid_batch_rolls_back_state_and_checkpoint_together(runtime: Runtime) -> None:
    from cadence.engine.consent import ConsentSubscriber
    from cadence.engine.profiles import ProfilesSubscriber

    ingest(runtime, *stream())
    crashing = Crashing(fail_on=30)
    loop = EngineLoop(runtime, [ProfilesSubscriber(runtime), ConsentSubscriber(), crashing], batch_size=10)
    with pytest.raises(RuntimeError):
        loop.catch_up()
    positions = loop.positions()
    assert max(p for name, p in positions.items() if name != "identity") < 30
    # Identity may run one batch ahead (PostgreSQL's look-ahead), never past the failed batch's events.
    assert positions["identity"] <= 30
    # "Restart": a new loop with a healthy subscriber continues from the checkpoint.
    crashing.fail_on = -1
    restarted = EngineLoop(
        runtime, [ProfilesSubscriber(runtime), ConsentSubscriber(), crashing], batch_size=10
    )
    restarted.catch_up()
    assert sorted(crashing.seen) == sorted(set(crashing.seen))  # nothing applied twice
    partial = snapshot(runtime.engine)
    assert sum(c for *_rest, c, _s in [(s[0], s[1], s[2], s[3]) for s in partial["stats"]]) > 0
    assert loop.lag() == 0 or restarted.lag() == 0


def test_feedback_is_counted_under_the_name_rules_read(runtime: Runtime) -> None:
    ingest(
        runtime,
        ev(1, event="Email Opened", userId="u1"),
        ev(2, event="Message Opened", userId="u1", properties={"channel": "email", "decision_id": "d1"}),
        ev(3, event="Message Clicked", userId="u1", properties={"channel": "sms"}),
        ev(4, event="Message Clicked", userId="u1"),  # no channel: only its own name
    )
    EngineLoop(runtime).catch_up()
    with runtime.engine.connect() as conn:
        p = load_profile(conn, customer(runtime, "u1"), now_ms=T0 + DAY)
    assert p.count("email.opened", T0 - DAY, T0 + DAY) == 2
    assert p.count("sms.clicked", T0 - DAY, T0 + DAY) == 1
    assert p.count("Message Clicked", T0 - DAY, T0 + DAY) == 2


class _Told:
    """A subscriber that records what the loop tells it about created customers."""

    name = "told"

    def __init__(self) -> None:
        self.told: list[frozenset[int]] = []

    def start(self, conn: Connection, checkpoint: int) -> int:
        return checkpoint

    def created(self, conn: Connection, customer_ids: frozenset[int]) -> None:
        self.told.append(customer_ids)

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        pass

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        pass

    def erased(self, conn: Connection, customer_id: int) -> None:
        pass


def test_subscribers_are_told_which_customers_a_batch_created(runtime: Runtime) -> None:
    told = _Told()
    loop = EngineLoop(runtime, [told])
    ingest(runtime, ev(1, event="Signed Up", userId="u1"), ev(2, event="Product Viewed", anonymousId="a9"))
    loop.catch_up()
    assert told.told == [frozenset({customer(runtime, "u1"), customer(runtime, "a9")})]
    # a known id and a link of two known ones create nobody: their rows are upserts
    ingest(runtime, ev(3, event="Order Completed", userId="u1"), ev(4, "alias", userId="u1", previousId="a9"))
    loop.catch_up()
    assert told.told[1] == frozenset()
    ingest(runtime, ev(5, event="Signed Up", userId="u2"))
    loop.catch_up()
    assert told.told[2] == frozenset({customer(runtime, "u2")})


def test_an_erasure_and_a_batch_at_once_do_not_deadlock(runtime: Runtime) -> None:
    """The erasure takes the loop's lock before the batch lock, as a batch does (the other order hung)."""
    import threading
    import time

    from sqlalchemy import text

    from cadence.engine.privacy import erase_customer

    loop = EngineLoop(runtime)
    ingest(runtime, ev(1, event="Viewed", userId="gone"), ev(2, event="Viewed", userId="stays"))
    loop.catch_up()
    ingest(runtime, ev(3, event="Viewed", userId="stays"))  # work for the batch below
    holding, go = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def batch() -> None:
        try:
            with loop.held():  # a batch in this process has begun ...
                holding.set()
                go.wait(10)
                loop.run_once()  # ... and now takes the batch lock
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def erase() -> None:
        try:
            erase_customer(runtime=runtime, ref="gone", requested_by="test", loop=loop)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    batcher, eraser = threading.Thread(target=batch), threading.Thread(target=erase)
    batcher.start()
    assert holding.wait(10)
    eraser.start()
    time.sleep(0.5)  # an erasure taking the batch lock first would hold it by now
    go.set()
    batcher.join(20)
    hung = batcher.is_alive()
    if hung and runtime.engine.dialect.name == "postgresql":  # unblock the batch so the test can end
        with runtime.engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
    batcher.join(60)
    eraser.join(60)
    assert not hung, "the batch and the erasure waited for each other"
    assert errors == []
    assert not eraser.is_alive()
    with runtime.engine.connect() as conn:
        assert resolve_customer(conn, "gone") is None
        stays = resolve_customer(conn, "stays")
        assert conn.scalar(select(profiles.c.event_count).where(profiles.c.customer_id == stays)) == 2


def test_positions_are_loaded_without_the_write_lock(runtime: Runtime, write_locks: list[str]) -> None:
    """Reloading the positions (and the learners' snapshot) must not hold up every writer (SQLite's lock)."""
    ingest(runtime, ev(1, "identify", userId="u1", traits={"name": "Ada"}))
    loop = EngineLoop(runtime)
    loop.catch_up()
    expected = loop.positions()
    write_locks.clear()
    taken = write_locks
    loop._positions = None  # as a worker following the leader's snapshots reloads them
    # (the learners start again from their snapshot, none taken here: position 0)
    assert {k: v for k, v in loop.positions().items() if k != "learners"} == {
        k: v for k, v in expected.items() if k != "learners"
    }
    assert taken == []
    if runtime.engine.dialect.name == "sqlite":  # (the check above is vacuous on PostgreSQL)
        with runtime.engine.begin():
            pass
        assert len(taken) == 1  # a write transaction does take it


def test_ids_freed_by_an_erasure_are_never_given_again(runtime: Runtime) -> None:
    """Erasing the newest customer deletes the log's newest events and the highest customer id.

    SQLite gives a table's next row the highest id + 1: a new event took an id the loop had
    already passed (and was never applied), and a new customer took the erased one's id.
    """
    from cadence.engine.privacy import erase_customer

    loop = EngineLoop(runtime)
    ingest(runtime, ev(1, event="Viewed", userId="stays"), ev(2, event="Viewed", userId="gone"))
    ingest(runtime, ev(3, event="Viewed", userId="gone"))
    loop.catch_up()
    with runtime.engine.connect() as conn:
        gone = resolve_customer(conn, "gone")
    erase_customer(runtime=runtime, ref="gone", requested_by="test", loop=loop)

    ingest(runtime, ev(4, event="Viewed", userId="new"), ev(5, event="Viewed", userId="stays"))
    loop.catch_up()
    with runtime.engine.connect() as conn:
        ids = conn.execute(select(events.c.id).order_by(events.c.id)).scalars().all()
        new = resolve_customer(conn, "new")
        stays = resolve_customer(conn, "stays")
        assert ids[1:] == [4, 5]  # after the erased 2 and 3, not again 2 and 3
        assert new is not None and new != gone
        assert (
            stays is not None and load_profile(conn, stays, now_ms=T0 + DAY).count("Viewed", 0, T0 + DAY) == 2
        )


def test_the_in_memory_subscribers_are_named_as_such(runtime: Runtime) -> None:
    """A loop over the stored state leaves out exactly the subscribers whose state is in memory."""
    from cadence.engine.loop import make_subscribers, stored_state_loop

    every = make_subscribers(runtime)
    assert {s.name for s in every if getattr(s, "in_memory", False)} == {"learners"}
    assert [s.name for s in stored_state_loop(runtime).subscribers] == [
        s.name for s in every if not getattr(s, "in_memory", False)
    ]


def test_a_value_that_is_not_a_finite_number_counts_as_none_and_the_loop_goes_on(runtime: Runtime) -> None:
    """``"revenue": "NaN"`` parsed as a float: on SQLite its sum broke every later batch (NOT NULL on
    the NaN), on PostgreSQL it made every later sum NaN."""
    loop = EngineLoop(runtime)
    ingest(
        runtime,
        ev(1, event="Order Completed", userId="u", properties={"revenue": "NaN"}),
        ev(2, event="Order Completed", userId="u", properties={"revenue": "Infinity", "total": 5}),
        ev(3, event="Order Completed", userId="u", properties={"revenue": 20}),
    )
    assert loop.catch_up() == 3
    with runtime.engine.connect() as conn:
        customer = resolve_customer(conn, "u")
        assert customer is not None
        profile = load_profile(conn, customer, now_ms=T0 + DAY)
    assert profile.count("Order Completed", 0, T0 + DAY) == 3
    assert profile.sum("Order Completed", "revenue", 0, T0 + DAY) == 25.0


def test_a_decision_follows_the_bounce_rules_of_consent(runtime: Runtime) -> None:
    """A soft bounce does not stop email, a hard one does until a new address: decisions read
    the consent, not "any Email Bounced ever" (which blocked email for good)."""
    from cadence.engine.campaign import Campaign as C
    from cadence.engine.campaign import ChannelPolicy, CompiledRuleset, GlobalSettings, TemplateSpec
    from cadence.engine.decide import decide

    rules = CompiledRuleset(
        hash="h",
        campaigns={"news": C(name="news", title="n", priority=1, audience=None, template=TemplateSpec("t"),
                             channels=ChannelPolicy(("email",)))},
        segments={}, settings=GlobalSettings(), aggregates=frozenset(),
    )  # fmt: skip
    loop = EngineLoop(runtime)

    def channel_now(n: int) -> str | None:
        loop.catch_up()
        with runtime.engine.connect() as conn:
            profile = load_profile(conn, customer(runtime, "u1"), now_ms=T0 + n * 60_000)
        d = decide(
            ruleset=rules, profile=profile, now_ms=T0 + n * 60_000, history=[], available_channels={"email"}
        )
        return d.channel

    ingest(runtime, ev(1, "identify", userId="u1", traits={"email": "a@example.com"}))
    ingest(runtime, ev(2, event="Email Bounced", userId="u1", properties={"bounce_type": "soft"}))
    assert channel_now(3) == "email"
    ingest(runtime, ev(4, event="Email Bounced", userId="u1"))
    assert channel_now(5) is None
    with runtime.engine.connect() as conn:  # said as a bounced address, not an opt-out
        profile = load_profile(conn, customer(runtime, "u1"), now_ms=T0)
    held = decide(ruleset=rules, profile=profile, now_ms=T0, history=[], available_channels={"email"})
    assert [(s.reason, s.detail) for s in held.suppressions] == [("bounced", "email address bounced")]
    ingest(runtime, ev(6, "identify", userId="u1", traits={"email": "b@example.com"}))
    assert channel_now(7) == "email"
