"""Two workers on one database: each one's learners learn the other's decisions, answered or not.

Every test runs on SQLite and PostgreSQL, through the HTTP API of two apps on the same database
(what ``cadence serve --workers 2`` runs). Each worker registers the decisions it commits with
its own learners; the other met them only when feedback named them, so it learned every clicked
send and none of the silences, and leaned towards yes (an outside check: mean engagement 0.70
on the other worker against 0.32 on the committing one). The learners now read the sends the
other processes queued (``LearnerSubscriber._others``).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine

from cadence.sim.api import in_process_api
from tests.api.test_learners_merges import DAY0, Run, iso, knowledge
from tests.api.test_simulate_api import learners_of


def test_a_worker_learns_the_silences_of_the_sends_another_worker_committed(db_engine: Engine) -> None:
    url = db_engine.url.render_as_string(hide_password=False)
    with in_process_api(url) as first, in_process_api(url) as second:
        committing, other = Run(first), Run(second)
        for run in (committing, other):
            learners_of(run.api.client.app).others_every = 0  # type: ignore[attr-defined]  # look at every batch
        users = [f"u{i}" for i in range(6)]
        for user in users:
            committing.post(
                "/v1/identify", {"userId": user, "traits": {"timezone": "UTC"}, "timestamp": iso(DAY0)}
            )
        sent = 0
        for day in range(3):
            at = DAY0 + timedelta(days=day, hours=9)
            for i, user in enumerate(users):
                answer = committing.post(
                    "/v1/decisions", {"customer_id": user, "at": iso(at), "mode": "commit"}
                )
                if answer["action"] == "send":
                    sent += 1
                    if i % 3 == 0:  # a third are clicked; nobody says anything of the others
                        committing.feedback(
                            {"userId": user}, answer, "Message Clicked", timedelta(minutes=20)
                        )
            committing.batch.append(
                {
                    "type": "track",
                    "userId": "clock",
                    "event": "Page Viewed",
                    "timestamp": iso(at + timedelta(hours=20)),
                }
            )
            committing.flush()
            other.api.sync()
        mine = knowledge(learners_of(first.client.app).learner)  # type: ignore[attr-defined]
        theirs = knowledge(learners_of(second.client.app).learner)  # type: ignore[attr-defined]
    assert sent >= 12 and mine["labels"] >= sent - 6  # the silences of days 0 and 1 are learned
    assert theirs == mine
