"""A committed decision is told to the learners only once its transaction committed.

The learners keep each committed send as a pending decision that later becomes a label
(clicked, or "no engagement" once the horizon passed). A commit whose transaction rolls
back (a failed group, a deadlock) must leave no such phantom behind. SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from cadence.api.routers.decisions import _learners
from cadence.engine.decisions_service import (
    DecisionRequestSpec,
    RawTransaction,
    commit_prepared,
    make_decision,
    prepare_commit,
    record_decisions,
)
from cadence.engine.learning import LearnerSubscriber
from cadence.runtime import Runtime
from cadence.store.db import begin_write
from tests.api.test_decisions_cache import AT_MS, RULES, Api

USERS = ("u1", "u2")


@pytest.fixture
def api(runtime: Runtime) -> Iterator[Api]:
    api = Api(runtime)
    for user in USERS:
        api.identify(userId=user, traits={"name": user, "timezone": "Europe/Berlin"})
        assert api.decide(user)["action"] == "send"  # cached, as a worker that decided for them before
    yield api
    api.state.close()


def learners_of(api: Api) -> LearnerSubscriber:
    found = _learners(api.app)
    assert found is not None
    return found


def pending_state(learners: LearnerSubscriber) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """What the learner remembers of committed decisions: the pending ones and their label times."""
    learner = learners.learner
    return dict(learner.pending), sorted(learner._heap())


def specs(api: Api, learners: LearnerSubscriber) -> list[DecisionRequestSpec]:
    return [
        DecisionRequestSpec(
            ruleset=RULES,
            customer_ref=user,
            now_ms=AT_MS,
            available_channels=api.app.state.available_channels,
            learners=learners,
            mode="commit",
        )
        for user in USERS
    ]


def transaction(runtime: Runtime) -> RawTransaction:
    proxied = runtime.engine.raw_connection()
    raw = proxied.driver_connection
    proxied.detach()
    begin_write(raw)
    return RawTransaction(raw, postgres=runtime.engine.dialect.name == "postgresql")


def test_a_rolled_back_group_of_commits_leaves_the_learner_unchanged(api: Api, runtime: Runtime) -> None:
    learners = learners_of(api)
    before = pending_state(learners)
    tx = transaction(runtime)
    try:
        bodies = record_decisions(tx, specs(api, learners), state=api.state)
        assert [b["action"] for b in bodies if isinstance(b, dict)] == ["send", "send"]
        tx.rollback()  # as a group whose transaction failed
    finally:
        tx.raw.close()
    assert pending_state(learners) == before
    # committed, the same group is remembered, with the features its rows keep
    tx = transaction(runtime)
    try:
        bodies = record_decisions(tx, specs(api, learners), state=api.state)
        assert pending_state(learners) == before  # not before the commit
        tx.commit()
    finally:
        tx.raw.close()
    ids = [b["decision_id"] for b in bodies if isinstance(b, dict)]
    assert len(ids) == 2 and all(i in learners.learner.pending for i in ids)
    with runtime.engine.connect() as conn:
        rows = dict(conn.exec_driver_sql("SELECT id, inputs FROM decisions").all())
    for decision_id in ids:
        stored = rows[decision_id]
        features = (stored if isinstance(stored, dict) else orjson.loads(stored))["features"]
        assert features == learners.learner.pending[decision_id].stored()


def test_a_commit_in_a_failed_sqlalchemy_transaction_leaves_the_learner_unchanged(
    api: Api, runtime: Runtime
) -> None:
    learners = learners_of(api)
    before = pending_state(learners)

    def commit(conn: Any) -> dict[str, Any]:
        return make_decision(
            conn=conn,
            ruleset=RULES,
            customer_ref="u1",
            now_ms=AT_MS,
            available_channels=api.app.state.available_channels,
            learners=learners,
            mode="commit",
            state=api.state,
        )

    with pytest.raises(RuntimeError, match="rolled back"), runtime.engine.begin() as conn:
        assert commit(conn)["action"] == "send"
        raise RuntimeError("rolled back")
    assert pending_state(learners) == before
    with runtime.engine.begin() as conn:
        body = commit(conn)
    assert body["action"] == "send" and body["decision_id"] in learners.learner.pending


def test_a_commit_over_http_is_remembered_once_committed(api: Api) -> None:
    learners = learners_of(api)
    body = api.decide("u2", mode="commit")
    assert body["action"] == "send" and body["queued"] is True
    assert body["decision_id"] in learners.learner.pending
    pending = pending_state(learners)
    assert api.decide("u2", mode="commit")["action"] == "none"  # capped: nothing to learn from
    assert pending_state(learners) == pending


def stored_features(runtime: Runtime, decision_id: str) -> dict[str, Any]:
    with runtime.engine.connect() as conn:
        rows = dict(conn.exec_driver_sql("SELECT id, inputs FROM decisions").all())
    stored = rows[decision_id]
    return dict((stored if isinstance(stored, dict) else orjson.loads(stored))["features"])


def test_a_commit_decided_ahead_keeps_its_features_through_a_rolled_back_group(
    api: Api, runtime: Runtime
) -> None:
    """A sending commit decided before its transaction (SQLite's path) gets its learner features as it
    is decided; recorded again after its group rolled back, it stores and registers those same ones,
    whatever the learner learned about the customer in between."""
    learners = learners_of(api)
    made = prepare_commit(specs(api, learners)[0], state=api.state)
    assert made.body["action"] == "send" and made.pending is not None
    decided_with = made.pending.stored()
    assert (
        decided_with
        == learners.pending_decision(
            customer_id=made.customer_id,
            traits=made.profile.traits,
            zone=made.profile.timezone,
            campaign=made.decision.campaign,
            channel=made.decision.channel,
            send_at_ms=made.decision.send_at_ms,
            arm=made.decision.arm,
            now_ms=AT_MS,
        ).stored()
    )
    before = pending_state(learners)
    tx = transaction(runtime)
    try:
        assert commit_prepared(tx, made, state=api.state)["action"] == "send"
        tx.rollback()  # its group failed
    finally:
        tx.raw.close()
    assert pending_state(learners) == before
    # The learner hears of a send to the customer meanwhile (their load and fatigue features change).
    learners.learner.customer(made.customer_id).sends.append(AT_MS - 60_000)
    tx = transaction(runtime)
    try:
        body = commit_prepared(tx, made, state=api.state)  # recorded again on its own
        assert made.decision_id not in learners.learner.pending  # not before the commit
        tx.commit()
    finally:
        tx.raw.close()
    assert body["decision_id"] == made.decision_id and body["queued"] is True
    assert learners.learner.pending[made.decision_id] is made.pending
    assert stored_features(runtime, made.decision_id) == decided_with == made.pending.stored()
    assert made.pending.load == 0  # as decided: the send learned of later is not in it
