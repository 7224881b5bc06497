"""Merged customers' sends: a decision counts every send of the person, whichever id got it.

Every test runs on SQLite and PostgreSQL. Identity stitching moves the merged-away customer's
sends to the customer it joined, in the transaction that merges them, so the caps, spacing
and exclusive groups every decision reads (the sends stored under the customer's id) count
them. The property: whatever the order of sends, identifies and aliases, no committed decision
sends more than the cap allows over all the sends of the customers it is made of.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, func, select, text

from cadence.dsl.loader import load_source
from cadence.engine import decisions_service
from cadence.engine.decision_state import DecisionState
from cadence.engine.decisions_service import make_decision
from cadence.engine.events import parse_call
from cadence.engine.identity import resolve_customer
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop
from cadence.runtime import Runtime
from cadence.store.schema.core import customers
from cadence.store.schema.sends import sends

HOUR = 3_600_000
T0 = 1_772_438_400_000  # 2026-03-02T08:00:00Z
CAP = 2

RULES = load_source(
    f"""
settings {{
    cap       {CAP} per 7d
}}

campaign hello "Hello" {{
    audience  true
    send      template "hello"
    channel   email
}}
"""
).raise_for_errors()

USERS = st.sampled_from(["u0", "u1"])
ANONS = st.sampled_from(["a0", "a1", "a2"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("see"), st.one_of(USERS, ANONS)),  # an event from one id: a customer
        st.tuples(st.just("identify"), USERS, ANONS),  # links them (merges, unless a shared device)
        st.tuples(st.just("alias"), ANONS, USERS),  # always merges
        st.tuples(st.just("commit"), st.one_of(USERS, ANONS)),
    ),
    min_size=1,
    max_size=14,
)
_EXAMPLES = itertools.count()


def members(conn: Connection, customer_id: int) -> list[int]:
    """The customer and every customer merged into it, at any depth."""
    out, frontier = [customer_id], [customer_id]
    while frontier:
        frontier = list(conn.scalars(select(customers.c.id).where(customers.c.merged_into.in_(frontier))))
        out.extend(frontier)
    return out


def counting_sends(conn: Connection, customer_ids: list[int]) -> int:
    return int(
        conn.scalar(
            select(func.count())
            .select_from(sends)
            .where(sends.c.customer_id.in_(customer_ids), sends.c.status.in_(("queued", "sending", "sent")))
        )
        or 0
    )


def call(op: tuple[str, ...], prefix: str, n: int) -> dict[str, Any]:
    kind, first, second = (*op, None)[:3]

    def ref(name: str | None) -> dict[str, str]:
        assert name is not None
        return {"userId" if name.startswith("u") else "anonymousId": prefix + name}

    base = {"messageId": f"{prefix}m{n}"}
    if kind == "see":
        return {"type": "identify", **ref(first), **base}
    if kind == "identify":
        return {"type": "identify", **ref(first), **ref(second), **base}
    return {"type": "alias", "previousId": prefix + str(first), "userId": prefix + str(second), **base}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
@example(  # the visitor's sends, then they log in as the (older) user: the user's commit is capped
    ops=[("see", "u0"), ("commit", "a0"), ("commit", "a0"), ("identify", "u0", "a0"), ("commit", "u0")]
)
@example(  # one send each, then an alias: the cap is reached only counting both
    ops=[
        ("see", "u0"),
        ("see", "a0"),
        ("commit", "u0"),
        ("commit", "a0"),
        ("alias", "a0", "u0"),
        ("commit", "u0"),
    ]
)
@example(  # a chain: a1 into a0's customer, that into u0's, across batches
    ops=[
        ("see", "u0"),
        ("commit", "a1"),
        ("see", "a0"),
        ("commit", "a0"),
        ("alias", "a1", "u1"),
        ("identify", "u1", "a0"),
        ("alias", "a0", "u0"),
        ("commit", "u0"),
        ("commit", "a1"),
    ]
)
def test_no_commit_exceeds_the_cap_over_the_merged_customers_sends(
    runtime: Runtime, ops: list[tuple[str, ...]]
) -> None:
    prefix = f"x{next(_EXAMPLES)}-"
    loop = EngineLoop(runtime)
    state = DecisionState(runtime.engine)
    pending: list[dict[str, Any]] = []
    now = T0
    try:
        for n, op in enumerate(ops):
            now += HOUR
            if op[0] != "commit":
                pending.append(call(op, prefix, n))
                continue
            if pending:
                record_events(engine=runtime.engine, batch=[parse_call(c, received_ms=now) for c in pending])
                loop.catch_up()
                pending = []
            ref = prefix + op[1]
            with runtime.engine.begin() as conn:
                customer = resolve_customer(conn, ref)
                if customer is None:
                    continue  # an id nobody sent yet: nothing to decide for
                before = counting_sends(conn, members(conn, customer))
                body = make_decision(
                    conn=conn,
                    ruleset=RULES,
                    customer_ref=ref,
                    now_ms=now,
                    available_channels=("email",),
                    learners=None,
                    mode="commit",
                    state=state,
                )
            assert body["customer_id"] == customer
            if body["action"] == "send":
                assert before < CAP, (op, before, body["explanation"])
            else:
                assert before >= CAP
                assert {s["reason"] for s in body["explanation"]["suppressions"]} == {"cap"}
    finally:
        state.close()


def test_a_commit_that_waited_for_a_merge_locks_the_customer_it_joined(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: a commit for the visitor read their customer while the merge into Ada was not yet
    committed, and waited for the visitor's row lock; once it has it, it reads Ada's customer. Another
    commit for Ada holds Ada's row and has queued her a send: the visitor's commit must lock Ada's row
    too (and so wait for that commit and count its send), not decide from what it read before.

    Ada has one send; the cap allows two. Before, the visitor's commit sent a third.
    """
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("row locks are PostgreSQL's (SQLite's write lock serialises every commit)")
    loop = EngineLoop(runtime)
    calls = [
        {"type": "identify", "userId": "ada", "messageId": "i1"},
        {"type": "identify", "anonymousId": "visitor", "messageId": "i2"},
    ]
    record_events(engine=runtime.engine, batch=[parse_call(c, received_ms=T0) for c in calls])
    loop.catch_up()
    with runtime.engine.connect() as conn:
        ada, visitor = resolve_customer(conn, "ada"), resolve_customer(conn, "visitor")
    assert ada is not None and visitor is not None and ada < visitor

    def commit(ref: str, state: DecisionState, conn: Connection) -> dict[str, Any]:
        return make_decision(
            conn=conn,
            ruleset=RULES,
            customer_ref=ref,
            now_ms=T0 + HOUR,
            available_channels=("email",),
            learners=None,
            mode="commit",
            state=state,
        )

    states = [DecisionState(runtime.engine) for _ in range(3)]
    with runtime.engine.begin() as conn:
        assert commit("ada", states[0], conn)["action"] == "send"
    alias = {"type": "alias", "previousId": "visitor", "userId": "ada", "messageId": "a1"}
    record_events(engine=runtime.engine, batch=[parse_call(alias, received_ms=T0)])

    adas_commit_holds = threading.Event()
    release_adas_commit = threading.Event()
    answers: dict[str, Any] = {}

    def adas_commit() -> None:
        with runtime.engine.begin() as conn:
            answers["ada"] = commit("ada", states[1], conn)
            adas_commit_holds.set()
            release_adas_commit.wait(30)

    lock_row = decisions_service._lock_row
    other = threading.Thread(target=adas_commit)

    def merge_first(conn: Any, customer_id: int) -> None:
        # The visitor's commit read the visitor's customer; the merge commits before it locks the row.
        if customer_id == visitor and not other.is_alive():
            loop.catch_up()
            other.start()
            assert adas_commit_holds.wait(30)
        lock_row(conn, customer_id)

    monkeypatch.setattr(decisions_service, "_lock_row", merge_first)

    def visitors_commit() -> None:
        with runtime.engine.begin() as conn:
            answers["visitor"] = commit("visitor", states[2], conn)

    mine = threading.Thread(target=visitors_commit)
    mine.start()
    with runtime.engine.connect() as conn:  # until the visitor's commit waits for Ada's commit's lock
        deadline = time.monotonic() + 30
        while not conn.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")):
            assert time.monotonic() < deadline, "the visitor's commit never waited for a lock"
            time.sleep(0.02)
    release_adas_commit.set()
    mine.join(30)
    other.join(30)
    for state in states:
        state.close()
    assert answers["ada"]["action"] == "send"
    assert answers["visitor"]["customer_id"] == ada
    assert answers["visitor"]["action"] == "none", answers["visitor"]["explanation"]
    with runtime.engine.connect() as conn:
        assert counting_sends(conn, [ada, visitor]) == CAP
