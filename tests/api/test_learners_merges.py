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

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import Engine, select

from cadence.engine.learners import DecisionLearner
from cadence.sim.api import ApiPolicy, in_process_api
from cadence.store.schema.core import customers
from tests.api.test_simulate_api import learners_of

DAY0 = datetime(2026, 3, 2, tzinfo=UTC)


def iso(at: datetime) -> str:
    return at.isoformat()


def knowledge(learner: DecisionLearner) -> dict[str, Any]:
    """Everything the learners know of each customer, their own effects included, and the shared posterior."""
    return {
        "customers": {
            cid: (
                c.clicks,
                sorted(c.sends),
                dict(c.channel_sends),
                dict(c.channel_clicks),
                None if c.effect is None else np.round(c.effect, 12).tolist(),
                None if c.hour_loglik is None else np.round(c.hour_loglik, 12).tolist(),
            )
            for cid, c in learner.customers.items()
        },
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
        assert knowledge(learners_of(restarted.client.app).learner) == before  # type: ignore[attr-defined]
