"""Two workers on one database: each one's learners learn the other's decisions, answered or not.

Every test runs on SQLite and PostgreSQL, through the HTTP API of two apps on the same database
(what ``cadence serve --workers 2`` runs). Each worker registers the decisions it commits with
its own learners; the other met them only when feedback named them, so it learned every clicked
send and none of the silences, and leaned towards yes (an outside check: mean engagement 0.70
on the other worker against 0.32 on the committing one). The learners now read the sends the
other processes queued (``LearnerSubscriber._others``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from cadence.sim.api import in_process_api
from tests.api.test_learners_merges import DAY0, Run, iso, knowledge
from tests.api.test_simulate_api import learners_of


def test_a_worker_learns_the_silences_of_the_sends_another_worker_committed(db_engine: Engine) -> None:
    url = db_engine.url.render_as_string(hide_password=False)
    with in_process_api(url) as first, in_process_api(url) as second:
        committing, other = Run(first), Run(second)
        look_every_batch(first, second)
        users = utc_customers(committing, 6)
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
            tick(committing, at + timedelta(hours=20))
            other.api.sync()
        mine = knowledge(learners_of(first.client.app).learner)  # type: ignore[attr-defined]
        theirs = knowledge(learners_of(second.client.app).learner)  # type: ignore[attr-defined]
    assert sent >= 12 and mine["labels"] >= sent - 6  # the silences of days 0 and 1 are learned
    assert theirs == mine


#: A campaign sent when asked for, at once, or at 07:30 when asked for in the quiet night.
QUIET_RULES = """
settings {
    timezone  "UTC"
}

campaign evening "Sent when asked for, or in the morning when asked for in the quiet night" {
    trigger   on "Evening"
    send      template "evening"
    channel   best of [email, push]
    quiet     22:00..07:30
}
"""


def test_a_worker_learns_the_labels_of_another_workers_deferred_sends_when_they_fall_due(
    db_engine: Engine, tmp_path: Path
) -> None:
    """Quiet hours defer a night's sends to 07:30, so a batch of the morning's clicks passes the label
    times (send + 6 h) of the evening's sends while its last event moves the clock less than an hour.
    The other worker used to look for the committed decisions only then (or a second later), learned
    those labels a batch later and in another order, and every option's value differed between the
    two workers of ``serve --workers 2`` (an outside check: 40 of 40)."""
    url = db_engine.url.render_as_string(hide_password=False)
    (tmp_path / "quiet.cadence").write_text(QUIET_RULES)
    with in_process_api(url, rules=tmp_path) as first, in_process_api(url, rules=tmp_path) as second:
        committing, other = Run(first), Run(second)
        for run in (committing, other):
            # No look on the wall clock's second here: only those the log's times call for.
            learners_of(run.api.client.app).others_every = 3600  # type: ignore[attr-defined]
        users = [f"u{i}" for i in range(8)]
        for user in users:
            committing.batch.append(
                {"type": "identify", "userId": user, "traits": {"timezone": "UTC"}, "timestamp": iso(DAY0)}
            )
        evening = DAY0 + timedelta(hours=18)
        tick(committing, evening)
        other.api.sync()
        # Four sent at once (18:00 to 20:00), four decided in the quiet night (22:30 to 00:30).
        minutes = [0, 40, 80, 120, 270, 310, 350, 390]
        answers = [
            committing.post(
                "/v1/decisions",
                {
                    "customer_id": user,
                    "at": iso(evening + timedelta(minutes=m)),
                    "mode": "commit",
                    "event": {"event": "Evening"},
                },
            )
            for user, m in zip(users, minutes, strict=True)
        ]
        morning = DAY0 + timedelta(days=1, hours=7, minutes=30)
        deferred = [a for a in answers if datetime.fromisoformat(a["send_at"]) == morning]
        assert len(deferred) == 4  # those decided from 22:30 on
        # In the order the users clicked: the morning's click (past the evening's labels) before the
        # evening's (within the hour of the clock, which the old look waited for).
        committing.feedback({"userId": "u5"}, answers[5], "Message Clicked", timedelta(minutes=10))
        committing.feedback({"userId": "u1"}, answers[1], "Message Clicked", timedelta(minutes=10))
        committing.flush()
        other.api.sync()
        mine = knowledge(learners_of(first.client.app).learner)  # type: ignore[attr-defined]
        theirs = knowledge(learners_of(second.client.app).learner)  # type: ignore[attr-defined]
        assert mine["labels"] == 8  # the evening's four sends, learned at the morning's click
        # The same labels learned in the same order (the morning's other sends are read later, before
        # their own labels fall due: the decisions awaiting labels differ until then).
        assert {k: v for k, v in theirs.items() if k != "pending"} == {
            k: v for k, v in mine.items() if k != "pending"
        }
        tick(committing, DAY0 + timedelta(days=4))
        other.api.sync()
        mine = knowledge(learners_of(first.client.app).learner)  # type: ignore[attr-defined]
        theirs = knowledge(learners_of(second.client.app).learner)  # type: ignore[attr-defined]
    assert mine["labels"] == 16 and not mine["pending"]
    assert theirs == mine


#: A campaign sent when asked for, at once: the labels fall due at known times (no slot is drawn).
NOW_RULES = """
settings {
    timezone  "UTC"
}

campaign now "Sent when asked for" {
    trigger   on "Now"
    send      template "now"
    channel   best of [email, push]
}
"""


def look_every_batch(*apis: Any) -> None:
    """Each process's learners look for the sends the others committed before every batch."""
    for api in apis:
        learners_of(api.client.app).others_every = 0


def utc_customers(run: Run, n: int) -> list[str]:
    """``n`` customers (``u0``, ``u1``, ...) identified in UTC on ``DAY0``; their user ids."""
    users = [f"u{i}" for i in range(n)]
    for user in users:
        run.post("/v1/identify", {"userId": user, "traits": {"timezone": "UTC"}, "timestamp": iso(DAY0)})
    return users


def tick(run: Run, at: datetime) -> None:
    """Move the log's clock to ``at``: an event of nobody's, whose time lets labels fall due."""
    run.batch.append({"type": "track", "userId": "clock", "event": "Page Viewed", "timestamp": iso(at)})
    run.flush()


def decided_now(run: Run, users: list[str], at: datetime) -> None:
    """A send to each of ``users`` at ``at``; every other one clicked 20 minutes later."""
    for i, user in enumerate(users):
        answer = run.post(
            "/v1/decisions",
            {"customer_id": user, "at": iso(at), "mode": "commit", "event": {"event": "Now"}},
        )
        assert answer["action"] == "send" and answer["send_at"] == iso(at), answer
        if i % 2:
            run.feedback({"userId": user}, answer, "Message Clicked", timedelta(minutes=20))
    run.flush()


def test_a_worker_forgets_a_customer_another_worker_erased_where_that_worker_did(
    db_engine: Engine, tmp_path: Path
) -> None:
    """An erasure made by one worker: the other worker's learners must not learn the erased customer's
    labels that fall due after it, which the erasing worker's learners (and a restart) never learn.

    The erasing process forgot the customer at once and snapshotted; another process forgot them only
    before writing its own next snapshot (a follower: never), so when time passed the erased
    customer's pending sends were learned as silences there alone, and every option's value differed
    between the two workers of ``serve --workers 2`` until a restart (a reproduction with erasures and
    time passing after them: 178 of 199 options)."""
    url = db_engine.url.render_as_string(hide_password=False)
    (tmp_path / "now.cadence").write_text(NOW_RULES)
    with in_process_api(url, rules=tmp_path) as first, in_process_api(url, rules=tmp_path) as second:
        erasing, other = Run(first), Run(second)
        look_every_batch(first, second)
        users = utc_customers(erasing, 4)
        at = DAY0 + timedelta(hours=9)
        decided_now(erasing, users, at)
        other.api.sync()
        r = first.client.delete("/v1/customers/u0", headers=first.headers)
        assert r.status_code == 200, r.text
        # Time passes: the sends' labels fall due, the erased customer's among them.
        tick(erasing, at + timedelta(days=4))
        other.api.sync()
        mine = knowledge(learners_of(first.client.app).learner)  # type: ignore[attr-defined]
        theirs = knowledge(learners_of(second.client.app).learner)  # type: ignore[attr-defined]
        with in_process_api(url, rules=tmp_path) as restarted:
            restarted.sync()
            after = knowledge(learners_of(restarted.client.app).learner)  # type: ignore[attr-defined]
    # Two labels for each of the others' sends, none for the erased customer's.
    assert not mine["pending"] and mine["labels"] == 6
    assert theirs == mine
    assert after == mine


def test_a_follower_behind_the_leader_when_it_erased_knows_what_the_leader_knows(
    db_engine: Engine, tmp_path: Path
) -> None:
    """A worker that does not lead follows the leader's log a poll behind. Forgetting an erased customer
    where it stood when it met the erasure, it would not learn the customer's labels the leader
    learned before the erasure: it loads the erasing process's snapshot instead, taken where the
    leader's learners forgot the customer, and follows the log from there."""
    url = db_engine.url.render_as_string(hide_password=False)
    (tmp_path / "now.cadence").write_text(NOW_RULES)
    with in_process_api(url, rules=tmp_path) as first, in_process_api(url, rules=tmp_path) as second:
        leader = Run(first)
        follower: Any = second.client.app.state.engine_loop  # type: ignore[attr-defined]
        look_every_batch(first, second)
        users = utc_customers(leader, 4)
        at = DAY0 + timedelta(hours=9)
        decided_now(leader, users, at)
        follower.follow_in_memory()
        # The leader learns every send's labels, the erased customer's among them, then erases them;
        # the follower has not looked since.
        tick(leader, at + timedelta(days=4))
        r = first.client.delete("/v1/customers/u0", headers=first.headers)
        assert r.status_code == 200, r.text
        follower.follow_in_memory()
        mine = knowledge(learners_of(first.client.app).learner)  # type: ignore[attr-defined]
        theirs = knowledge(learners_of(second.client.app).learner)  # type: ignore[attr-defined]
    assert not mine["pending"] and mine["labels"] == 8  # the erased customer's learned before the erasure
    assert theirs == mine
