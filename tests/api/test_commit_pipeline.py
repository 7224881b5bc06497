"""PostgreSQL commits recorded in groups on the event loop (:mod:`cadence.api.commitpipe`).

A group of commits (distinct cached customers) locks and checks its customers, decides on the
event loop and writes and commits in one more round trip, without a thread. These tests check
that each commit is recorded exactly once and answered as recorded, that the learners hear of a
decision only once it committed, that a customer's second commit waits for the next group and
counts the first one's send (caps), also across two workers, and that a commit the group cannot
record (a changed profile, a failed group) is recorded on its own instead, exactly once.
PostgreSQL only (SQLite commits take the write lock, in a thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from cadence.api import commitpipe
from cadence.api.app import create_app
from cadence.api.commitpipe import CommitPipeline
from cadence.api.routers.decisions import _learners
from cadence.engine.campaign import CompiledRuleset, SplitArm
from cadence.engine.decisions_service import DecidedGroup, DecisionRequestSpec
from cadence.runtime import Runtime
from tests.api.test_decisions_cache import AT, AT_MS, RULES, Api, reasons
from tests.api.test_httpproto import serving

USERS = [f"u{i}" for i in range(5)]


@pytest.fixture
def api(runtime: Runtime) -> Iterator[Api]:
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("commits are recorded on the event loop on PostgreSQL only")
    api = Api(runtime)
    for i, user in enumerate(USERS):
        api.identify(userId=user, traits={"name": f"N{i}", "timezone": "Europe/Berlin"})
        assert api.decide(user)["action"] == "send"  # cached, as a worker that decided for them before
    yield api
    api.state.close()


def spec(api: Api, ref: str, ruleset: CompiledRuleset = RULES) -> DecisionRequestSpec:
    return DecisionRequestSpec(
        ruleset=ruleset,
        customer_ref=ref,
        now_ms=AT_MS,
        available_channels=api.app.state.available_channels,
        learners=_learners(api.app),
        mode="commit",
    )


def pipelined(
    pipeline: CommitPipeline, api: Api, refs: list[str], ruleset: CompiledRuleset = RULES
) -> list[tuple[str, Any]]:
    """Submit a commit for each of ``refs`` in one event-loop iteration: ("settled", answer) or ("redo", None)."""

    async def main() -> list[tuple[str, Any]]:
        loop = asyncio.get_running_loop()
        futures = []
        for ref in refs:
            customer = pipeline.customer_of(ref)
            assert customer is not None, ref
            future: asyncio.Future[tuple[str, Any]] = loop.create_future()
            pipeline.submit(
                customer,
                spec(api, ref, ruleset),
                lambda result, f=future: f.set_result(("settled", result)),
                lambda f=future: f.set_result(("redo", None)),
            )
            futures.append(future)
        return list(await asyncio.wait_for(asyncio.gather(*futures), 20))

    try:
        return asyncio.run(main())
    finally:
        pipeline.close()


def stored(runtime: Runtime) -> tuple[dict[str, str], dict[str, int]]:
    """The recorded decisions (id -> action) and each decision's number of queued sends."""
    with runtime.engine.connect() as conn:
        decisions = dict(conn.exec_driver_sql("SELECT id, action FROM decisions").all())  # type: ignore[arg-type]
        sends = dict(
            conn.exec_driver_sql("SELECT decision_id, COUNT(*) FROM sends GROUP BY decision_id").all()  # type: ignore[arg-type]
        )
    return decisions, sends


def test_a_group_records_each_commit_once_and_tells_the_learners_once_committed(
    api: Api, runtime: Runtime
) -> None:
    pipeline = CommitPipeline(api.state)
    learners = _learners(api.app)
    assert learners is not None
    results = pipelined(pipeline, api, USERS)
    assert pipeline.groups == 1 and pipeline.recorded == len(USERS) and pipeline.redone == 0
    bodies = [body for kind, body in results]
    assert all(kind == "settled" for kind, _ in results)
    assert all(b["action"] == "send" and b["queued"] is True and b["mode"] == "commit" for b in bodies)
    decisions, sends = stored(runtime)
    assert decisions == {b["decision_id"]: "send" for b in bodies}
    assert sends == {b["decision_id"]: 1 for b in bodies}
    assert all(b["decision_id"] in learners.learner.pending for b in bodies)
    # What was recorded is what was answered.
    for body in bodies:
        r = api.client.get(f"/v1/decisions/{body['decision_id']}", headers=api.keys["decide"])
        assert r.status_code == 200
        got = r.json()
        assert (got["action"], got["campaign"], got["channel"], got["send_at"], got["explanation"]) == (
            body["action"],
            body["campaign"],
            body["channel"],
            body["send_at"],
            body["explanation"],
        )
    # A second round: capped by the sends the first one queued, and nothing new to learn from.
    again = pipelined(CommitPipeline(api.state), api, USERS)
    assert all(kind == "settled" and b["action"] == "none" and "cap" in reasons(b) for kind, b in again)
    assert len(learners.learner.pending) == len(USERS)


def test_a_group_writes_the_holdout_arms_its_decisions_drew(api: Api, runtime: Runtime) -> None:
    # The arms a holdout lift counts go with the group's other writes, held-out customers included.
    daily = RULES.campaigns["daily"]
    split = (SplitArm("holdout", 0.5, holdout=True), SplitArm("main", 0.5))
    held = dataclasses.replace(RULES, campaigns={"daily": dataclasses.replace(daily, split=split)})
    pipeline = CommitPipeline(api.state)
    results = pipelined(pipeline, api, USERS, held)
    assert pipeline.groups == 1 and pipeline.redone == 0
    bodies = [body for kind, body in results]
    expected = {(b["customer_id"], "daily" in b["explanation"]["holdout"]) for b in bodies}
    with runtime.engine.connect() as conn:
        arms = {
            (c, bool(h), ms)
            for c, h, ms in conn.exec_driver_sql("SELECT customer_id, held, first_ms FROM arm_assignments")
        }
    assert {(c, h) for c, h, _ms in arms} == expected and {ms for _c, _h, ms in arms} == {AT_MS}
    assert 0 < sum(h for _c, h in expected) < len(USERS)  # both arms drawn


def test_a_customers_second_commit_waits_for_the_next_group_and_is_capped(api: Api, runtime: Runtime) -> None:
    pipeline = CommitPipeline(api.state)
    results = pipelined(pipeline, api, ["u0", "u1", "u0", "u0", "u1"])
    assert pipeline.groups == 3  # one commit per customer and group
    actions = [(kind, b["customer_id"], b["action"]) for kind, b in results]
    first = {b["customer_id"] for _, b in results[:2]}
    assert [a for _, _, a in actions] == ["send", "send", "none", "none", "none"]
    assert {c for _, c, _ in actions} == first
    decisions, sends = stored(runtime)
    assert len(decisions) == 5 and sum(sends.values()) == 2


def test_a_changed_profile_is_recorded_on_its_own(api: Api, runtime: Runtime) -> None:
    pipeline = CommitPipeline(api.state)
    api.identify(userId="u0", traits={"name": "Changed"})  # the stamp moves: the cached entry is stale
    results = pipelined(pipeline, api, ["u0", "u1"])
    assert results[0] == ("redo", None)  # the thread path reads (and reloads) it
    assert results[1][0] == "settled" and results[1][1]["action"] == "send"
    assert pipeline.redone == 1 and pipeline.recorded == 1
    decisions, _ = stored(runtime)
    assert list(decisions) == [results[1][1]["decision_id"]]


def test_a_group_whose_connection_broke_records_nothing_and_hands_every_commit_back(
    api: Api, runtime: Runtime
) -> None:
    pipeline = CommitPipeline(api.state)
    pipeline._connection()  # open it, then end its session from the server's side
    with runtime.engine.begin() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pipeline._conn.info.backend_pid})
    results = pipelined(pipeline, api, USERS[:3])
    assert results == [("redo", None)] * 3
    assert stored(runtime) == ({}, {})
    # The next group opens a new connection.
    again = CommitPipeline(api.state)
    assert all(kind == "settled" for kind, _ in pipelined(again, api, USERS[:3]))


def test_a_group_whose_write_fails_rolls_back_and_tells_the_learners_nothing(
    api: Api, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    learners = _learners(api.app)
    assert learners is not None
    decide_group = commitpipe.decide_group

    def twice(*args: Any, **kwargs: Any) -> DecidedGroup:
        group = decide_group(*args, **kwargs)
        group.sends.append(group.sends[0])  # the same send key twice: the second insert fails
        return group

    monkeypatch.setattr(commitpipe, "decide_group", twice)
    pipeline = CommitPipeline(api.state)
    results = pipelined(pipeline, api, USERS[:2])
    assert results == [("redo", None)] * 2
    assert stored(runtime) == ({}, {})  # the first decision rows and send rolled back with the group
    assert learners.learner.pending == {}
    assert pipeline.groups == 0 and pipeline.recorded == 0


def post_commits(url: str, api: Api, refs: list[str], start: threading.Barrier | None = None) -> list[Any]:
    async def run() -> list[Any]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            if start is not None:
                start.wait()
            answers = await asyncio.gather(
                *(
                    client.post(
                        "/v1/decisions",
                        json={"customer_id": ref, "at": AT, "fresh": False, "mode": "commit"},
                        headers=api.keys["decide"],
                    )
                    for ref in refs
                )
            )
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return [a.json() for a in answers]

    return asyncio.run(run())


def test_two_workers_committing_over_http_for_the_same_customers_keep_a_cap_of_one_each(
    api: Api, runtime: Runtime
) -> None:
    other = create_app(runtime=runtime, background=False)
    other.state.ruleset = RULES
    apps: list[FastAPI] = [api.app, other]
    start = threading.Barrier(2)
    try:
        with serving(api.app) as first, serving(other) as second:
            # Cached in both workers (a preview each).
            for url in (first, second):
                with httpx.Client(base_url=url) as client:
                    for user in USERS:
                        r = client.post(
                            "/v1/decisions",
                            json={"customer_id": user, "at": AT, "fresh": False},
                            headers=api.keys["decide"],
                        )
                        assert r.status_code == 200 and r.json()["action"] == "send"
            orders = [USERS * 2, list(reversed(USERS)) * 2]
            with ThreadPoolExecutor(2) as pool:
                bodies = [
                    b
                    for answers in pool.map(post_commits, [first, second], [api, api], orders, [start, start])
                    for b in answers
                ]
        recorded = sum(a.state.commit_pipeline.recorded for a in apps)
    finally:
        other.state.decision_state.close()
    assert recorded >= len(USERS)  # most, if not all, through the groups on the event loop
    for user_id in {b["customer_id"] for b in bodies}:
        actions = sorted(str(b["action"]) for b in bodies if b["customer_id"] == user_id)
        assert actions == ["none", "none", "none", "send"], (user_id, actions)
    assert all("cap" in reasons(b) for b in bodies if b["action"] == "none")
    decisions, sends = stored(runtime)
    assert len(decisions) == 4 * len(USERS) and sum(sends.values()) == len(USERS)
    assert set(decisions) == {b["decision_id"] for b in bodies}


def test_the_pipeline_plans_its_statements_once_generic(api: Api) -> None:
    """Left to the plan cache, the first five executions of each statement are planned anew (custom
    plans), and the check stays so wherever its custom plans look cheaper: the connection forces generic
    plans (``CHECK_SESSION_PG``), so no statement is planned again per group."""
    from psycopg.pq import ExecStatus

    pipeline = CommitPipeline(api.state)

    async def main() -> list[tuple[bytes, ...]]:
        loop = asyncio.get_running_loop()
        futures = []
        for _ in range(7):  # one customer's commits: seven groups, one after the other
            future: asyncio.Future[Any] = loop.create_future()
            pipeline.submit(
                pipeline.customer_of("u0") or 0,
                spec(api, "u0"),
                lambda result, f=future: f.set_result(result),
                lambda f=future: f.set_result(None),
            )
            futures.append(future)
        answers = await asyncio.wait_for(asyncio.gather(*futures), 20)
        assert all(a is not None and not isinstance(a, Exception) for a in answers)
        pgconn = pipeline._conn.pgconn  # idle between groups: ask on the pipeline's own session
        pgconn.nonblocking = 0
        pgconn.send_query_params(
            b"SELECT name, generic_plans, custom_plans FROM pg_prepared_statements ORDER BY name", None
        )
        pgconn.pipeline_sync()
        rows: list[tuple[bytes, ...]] = []
        while (res := pgconn.get_result()) is None or res.status != ExecStatus.PIPELINE_SYNC:
            if res is not None and res.status == ExecStatus.TUPLES_OK:
                rows = [tuple(res.get_value(i, j) for j in range(3)) for i in range(res.ntuples)]
        return rows

    try:
        rows = asyncio.run(main())
    finally:
        pipeline.close()
    assert pipeline.groups == 7 and pipeline.redone == 0
    plans = {name.decode(): (int(generic), int(custom)) for name, generic, custom in rows}
    assert plans["cadence_commit_check"] == (7, 0)
    assert plans["cadence_commit_lock"] == (7, 0)
    assert plans["cadence_commit_decision"] == (7, 0)
