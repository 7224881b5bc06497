"""Merged customers' sends: a decision counts every send of the person, whichever id got it.

Every test runs on SQLite and PostgreSQL. Identity stitching moves the merged-away customer's
sends to the customer it joined, in the transaction that merges them, so the caps, spacing
and exclusive groups every decision reads (the sends stored under the customer's id) count
them. The property: whatever the order of sends, identifies and aliases, no committed decision
sends more than the cap allows over all the sends of the customers it is made of.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, func, select

from cadence.dsl.loader import load_source
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
