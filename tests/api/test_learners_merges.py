"""A customer merged after the learners' last snapshot: a restart must know what the live learners knew.

Every test runs on SQLite and PostgreSQL, through the HTTP API. A user (u1) and a visitor (a1)
get decisions and feedback; the learners take a snapshot; the visitor's sends are labelled
after it; then an identify carrying both ids stitches the visitor into the user. A restart
loads the snapshot and replays the log. It used to fold every merge before the replay, so the
visitor's labels after the snapshot taught the user's own engagement effect, where the live
learners had taught the visitor's (an outside check: a merged customer's email effect 0.608
before a restart, 0.660 after). The learners now fold a merge where the log made it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from cadence.engine.learners import CustomerStats, DecisionLearner
from cadence.sim.api import ApiPolicy, in_process_api
from cadence.store.schema.core import customers
from tests.api.test_simulate_api import learners_of

DAY0 = datetime(2026, 3, 2, tzinfo=UTC)


def iso(at: datetime) -> str:
    return at.isoformat()


def knowledge(learner: DecisionLearner) -> dict[str, Any]:
    """Everything the learners know of each customer, their own effects included, and the shared posterior.

    An effect still at its prior is the same knowledge as none (valuing a live decision creates it),
    and so is a customer whose stats are all empty."""
    prior = learner.effect(-1).copy()
    learner.customers.pop(-1)

    def effect(value: np.ndarray | None) -> list[list[float]] | None:
        if value is None or np.array_equal(value, prior):
            return None
        return np.round(value, 12).tolist()  # type: ignore[no-any-return]

    def stats(c: CustomerStats) -> tuple[Any, ...]:
        loglik = None if c.hour_loglik is None else np.round(c.hour_loglik, 12).tolist()
        return (
            c.clicks,
            sorted(c.sends),
            dict(c.channel_sends),
            dict(c.channel_clicks),
            effect(c.effect),
            loglik,
        )

    empty = (0, [], {}, {}, None, None)
    return {
        "customers": {cid: stats(c) for cid, c in learner.customers.items() if stats(c) != empty},
        "pending": sorted((k, p.customer_id) for k, p in learner.pending.items()),
        "labels": learner.labels,
        "engagement": np.round(learner.engagement.mean, 12).tolist(),
    }


class Run:
    def __init__(self, api: ApiPolicy) -> None:
        self.api = api
        self.batch: list[dict[str, Any]] = []

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.api.client.post(path, json=body, headers=self.api.headers)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def decide(self, who: str, at: datetime) -> dict[str, Any]:
        answer = self.post("/v1/decisions", {"customer_id": who, "at": iso(at), "mode": "commit"})
        assert answer["action"] == "send", answer
        return answer

    def feedback(self, who: dict[str, str], answer: dict[str, Any], event: str, after: timedelta) -> None:
        send_at = datetime.fromisoformat(answer["send_at"])
        self.batch.append(
            {
                "type": "track",
                **who,
                "event": event,
                "properties": {"decision_id": answer["decision_id"], "channel": answer["channel"]},
                "timestamp": iso(send_at + after),
            }
        )

    def flush(self) -> None:
        self.post("/v1/batch", {"batch": self.batch})
        self.batch = []
        self.api.sync()


def test_a_restart_knows_what_the_live_learners_knew_of_a_customer_merged_after_the_snapshot(
    db_engine: Engine,
) -> None:
    url = db_engine.url.render_as_string(hide_password=False)
    user, visitor = {"userId": "u1"}, {"anonymousId": "a1"}
    with in_process_api(url) as api:
        run = Run(api)
        for who in (user, visitor):
            run.post("/v1/identify", {**who, "traits": {"timezone": "UTC"}, "timestamp": iso(DAY0)})
        for day in range(3):
            at = DAY0 + timedelta(days=day, hours=9)
            mine, theirs = run.decide("u1", at), run.decide("a1", at)
            run.feedback(user, mine, "Message Delivered", timedelta(minutes=1))
            run.feedback(visitor, theirs, "Message Delivered", timedelta(minutes=1))
            run.feedback(
                user if day % 2 else visitor,
                mine if day % 2 else theirs,
                "Message Clicked",
                timedelta(minutes=30),
            )
            if day == 1:
                run.flush()
                with db_engine.begin() as conn:  # what the server does every 10,000 events
                    learners_of(api.client.app).snapshot(conn, now_ms=int(at.timestamp() * 1000))  # type: ignore[attr-defined]
            # the evening's events move the learners' clock past the labels' delay: these sends
            # are labelled now, the visitor's as the visitor's
            run.batch.append(
                {"type": "track", **user, "event": "Page Viewed", "timestamp": iso(at + timedelta(hours=14))}
            )
            run.flush()
        learner = learners_of(api.client.app).learner  # type: ignore[attr-defined]
        ids = {cid for cid, c in learner.customers.items() if c.effect is not None}
        assert len(ids) == 2  # both have an effect of their own, learned after the snapshot too

        # Day 3: the visitor logs in (an identify with both ids merges a1 into u1), and both ids decide.
        run.post("/v1/identify", {**user, **visitor, "timestamp": iso(DAY0 + timedelta(days=3, hours=8))})
        api.sync()
        with db_engine.connect() as conn:
            merged = conn.execute(
                select(customers.c.id, customers.c.merged_into, customers.c.merged_at_event).where(
                    customers.c.merged_into.is_not(None)
                )
            ).all()
        assert len(merged) == 1 and merged[0].merged_at_event is not None
        at = DAY0 + timedelta(days=3, hours=9)
        answer = run.decide("a1", at)
        run.feedback(user, answer, "Message Clicked", timedelta(minutes=20))
        run.batch.append(
            {"type": "track", **user, "event": "Page Viewed", "timestamp": iso(at + timedelta(hours=14))}
        )
        run.flush()
        before = knowledge(learner)
        assert merged[0].id not in before["customers"] and merged[0].merged_into in before["customers"]

    with in_process_api(url) as restarted:
        restarted.sync()
        after = knowledge(learners_of(restarted.client.app).learner)  # type: ignore[attr-defined]
        assert after == before


USERS = st.sampled_from(["u0", "u1"])
ANONS = st.sampled_from(["a0", "a1", "a2"])
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("decide"), st.one_of(USERS, ANONS)),
        # decided as of hours before the events already logged (a simulator whose customers keep
        # clocks of their own): its labels may be due already
        st.tuples(st.just("back"), st.one_of(USERS, ANONS), st.integers(1, 60)),
        st.tuples(
            st.just("feedback"),
            st.sampled_from(["Message Delivered", "Message Clicked", "Message Bounced"]),
            st.integers(0, 9),
        ),
        st.tuples(st.just("identify"), USERS, ANONS),  # links them (merges, unless a shared device)
        st.tuples(st.just("alias"), ANONS, USERS),  # always merges
        st.tuples(st.just("snapshot")),
        st.tuples(st.just("later"), st.integers(6, 40)),  # hours pass: labels fall due
    ),
    min_size=4,
    max_size=18,
)
_EXAMPLES = itertools.count()


@pytest.fixture
def live(db_engine: Engine) -> Iterator[tuple[Engine, Run]]:
    url = db_engine.url.render_as_string(hide_password=False)
    with in_process_api(url) as api:
        yield db_engine, Run(api)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
@example(  # clicks learned after a snapshot, then the visitor logs in
    ops=[
        ("decide", "u0"),
        ("decide", "a0"),
        ("feedback", "Message Clicked", 1),
        ("snapshot",),
        ("later", 30),
        ("identify", "u0", "a0"),
        ("decide", "a0"),
        ("later", 30),
    ]
)
@example(  # decisions as of before the clock: the live learners register them after later events
    ops=[
        ("decide", "u0"),
        ("feedback", "Message Clicked", 0),
        ("later", 30),
        ("back", "u0", 40),
        ("feedback", "Message Clicked", 1),
        ("decide", "u1"),
        ("back", "u1", 50),
        ("later", 30),
    ]
)
@example(  # provisional labels learned before one send bounced: the replay must learn them in that order
    ops=[
        ("decide", "u0"),
        ("later", 7),
        ("decide", "a0"),
        ("feedback", "Message Clicked", 1),
        ("later", 30),
        ("feedback", "Message Bounced", 0),
        ("later", 30),
    ]
)
def test_a_restart_after_any_interleaving_of_decisions_feedback_and_merges_knows_what_the_live_learners_knew(
    live: tuple[Engine, Run], ops: list[tuple[Any, ...]]
) -> None:
    """Decisions (some as of hours before the events already logged), their feedback, identifies and
    aliases (which merge), snapshots and time passing, in any order: an app started afresh on the database (the snapshot, then the log after it) knows what the
    live app's learners know, merged customers included. One database for every example (each with ids
    of its own, later in simulated time): the restarted app replays them all."""
    engine, run = live
    n = next(_EXAMPLES)
    prefix = f"x{n}-"
    clock = [DAY0 + timedelta(days=10 * n, hours=9)]
    answers: list[tuple[dict[str, str], dict[str, Any]]] = []

    def ref(name: str) -> dict[str, str]:
        return {"userId" if name.startswith("u") else "anonymousId": prefix + name}

    def event(body: dict[str, Any]) -> None:
        run.post("/v1/batch", {"batch": [{**body, "timestamp": iso(clock[0])}]})
        run.api.sync()

    for op in ops:
        clock[0] += timedelta(minutes=10)
        kind = op[0]
        if kind in ("decide", "back"):
            event({"type": "identify", **ref(op[1]), "traits": {"timezone": "UTC"}})
            at = clock[0] - timedelta(hours=op[2] if kind == "back" else 0)
            answer = run.post(
                "/v1/decisions", {"customer_id": prefix + op[1], "at": iso(at), "mode": "commit"}
            )
            if answer["action"] == "send":
                answers.append((ref(op[1]), answer))
        elif kind == "feedback" and answers:
            who, answer = answers[op[2] % len(answers)]
            run.feedback(who, answer, op[1], timedelta(minutes=5))
            run.batch[-1]["timestamp"] = iso(
                clock[0]
            )  # in the order of the ops, after the send is due or not
            run.flush()
        elif kind == "identify":
            event({"type": "identify", **ref(op[1]), **ref(op[2])})
        elif kind == "alias":
            event({"type": "alias", "previousId": prefix + op[1], "userId": prefix + op[2]})
        elif kind == "snapshot":
            with engine.begin() as conn:
                learners_of(run.api.client.app).snapshot(conn, now_ms=int(clock[0].timestamp() * 1000))  # type: ignore[attr-defined]
        elif kind == "later":
            clock[0] += timedelta(hours=op[1])
            event({"type": "track", "userId": prefix + "clock", "event": "Page Viewed"})
    before = knowledge(learners_of(run.api.client.app).learner)  # type: ignore[attr-defined]
    url = engine.url.render_as_string(hide_password=False)
    with in_process_api(url) as restarted:
        restarted.sync()
        after = knowledge(learners_of(restarted.client.app).learner)  # type: ignore[attr-defined]
        assert after == before
