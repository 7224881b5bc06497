"""PostgreSQL commits recorded a group at a time (``record_decisions``): caps across workers, failures.

A group of commits for distinct cached customers takes four statements (lock, check, and one
``executemany`` each for the decision rows and the sends). These tests run two apps (two
workers' caches and group writers) committing for the same customers at once, and a group
whose transaction fails: it records nothing, and each of its requests is then decided and
recorded on its own. PostgreSQL only (SQLite commits are decided before their transaction).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from cadence.api.app import create_app
from cadence.runtime import Runtime
from tests.api.test_decisions_cache import AT, RULES, Api, post_commits, reasons

USERS = [f"u{i}" for i in range(5)]


@pytest.fixture
def api(runtime: Runtime) -> Iterator[Api]:
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("commit groups take shared statements on PostgreSQL only")
    api = Api(runtime)
    for i, user in enumerate(USERS):
        api.identify(userId=user, traits={"name": f"N{i}"})
    yield api
    api.state.close()


def warm(app: FastAPI, api: Api) -> None:
    """Each process knows the customers (as a worker that decided for them before)."""
    client = TestClient(app)  # (not entered: its shutdown would close the cache)
    for user in USERS:
        r = client.post(
            "/v1/decisions", json={"customer_id": user, "at": AT, "fresh": False}, headers=api.keys["decide"]
        )
        assert r.status_code == 200 and r.json()["action"] == "send", r.text


def commit_all(app: FastAPI, api: Api, refs: list[str], start: threading.Barrier | None = None) -> list[dict]:
    answers = post_commits(app, api, refs, start)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [a.json() for a in answers]


def counts(runtime: Runtime) -> tuple[int, int]:
    with runtime.engine.connect() as conn:
        recorded = conn.exec_driver_sql("SELECT COUNT(*) FROM decisions").scalar()
        queued = conn.exec_driver_sql("SELECT COUNT(*) FROM sends").scalar()
    return int(recorded or 0), int(queued or 0)


def test_two_workers_groups_for_the_same_customers_keep_a_cap_of_one_each(api: Api, runtime: Runtime) -> None:
    other = create_app(runtime=runtime, background=False)
    other.state.ruleset = RULES
    apps = [api.app, other]
    for app in apps:
        warm(app, api)
    start = threading.Barrier(2)
    # Each worker commits once for every customer, in a different order: the groups lock in id order.
    orders = [USERS, list(reversed(USERS))]
    try:
        with ThreadPoolExecutor(2) as pool:
            bodies = [
                b
                for answers in pool.map(commit_all, apps, [api, api], orders, [start, start])
                for b in answers
            ]
    finally:
        other.state.decision_state.close()
    for user_id in {b["customer_id"] for b in bodies}:
        actions = sorted(str(b["action"]) for b in bodies if b["customer_id"] == user_id)
        assert actions == ["none", "send"], (user_id, actions)
    assert all("cap" in reasons(b) for b in bodies if b["action"] == "none")
    assert all(b["queued"] is True for b in bodies if b["action"] == "send")
    grouped = api.state.grouped + other.state.decision_state.grouped
    assert grouped >= 2  # at least one group took the shared statements
    assert counts(runtime) == (2 * len(USERS), len(USERS))
    for body in bodies:  # every answered commit is recorded as answered
        r = api.client.get(f"/v1/decisions/{body['decision_id']}", headers=api.keys["decide"])
        assert r.status_code == 200 and r.json()["action"] == body["action"]


def test_a_failed_group_records_nothing_and_each_request_is_recorded_alone(
    api: Api, runtime: Runtime
) -> None:
    warm(api.app, api)
    groups_app = api.app
    from cadence.api.routers.decisions import _groups

    groups = _groups(groups_app)
    broken = groups._take_writer()  # the writer the next group takes: its session ended by the server
    with runtime.engine.begin() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": broken.info.backend_pid})
    groups._give_back(broken)
    bodies = commit_all(api.app, api, USERS)
    assert sorted(str(b["action"]) for b in bodies) == ["send"] * len(USERS)
    assert api.state.grouped == 0  # the group failed; each was then recorded on its own
    assert counts(runtime) == (len(USERS), len(USERS))  # nothing twice: the failed group wrote nothing
    again = commit_all(api.app, api, USERS)  # a new writer: grouped again, capped by the sends above
    assert all(b["action"] == "none" and "cap" in reasons(b) for b in again)
    assert api.state.grouped > 0


def test_the_group_check_reads_the_rows_of_the_batched_check(api: Api, runtime: Runtime) -> None:
    """CHECK_GROUP_PG (each customer looked up by index, whatever the plan) reads what CHECK_MANY_PG reads."""
    from cadence.engine.decision_state import CHECK_GROUP_PG, CHECK_MANY_PG

    warm(api.app, api)
    commit_all(api.app, api, USERS[:3])  # sends queued for three of them
    ids = sorted(c for c in (api.state.customer_of(u) for u in USERS) if c is not None)
    with runtime.engine.connect() as conn:
        conn.exec_driver_sql("DELETE FROM profiles WHERE customer_id = %s", (ids[-1],))  # a profile not built
        conn.commit()
        raw = conn.connection.dbapi_connection
        assert raw is not None

        def rows(sql: str) -> list[tuple[object, ...]]:
            cur = raw.cursor()
            try:
                cur.execute(
                    sql.replace("$1", "%(ids)s").replace("$2", "%(since)s"),
                    {"ids": [*ids, 10**9], "since": 0},
                )
                return sorted(tuple(r) for r in cur.fetchall())
            finally:
                cur.close()

        many, group = rows(CHECK_MANY_PG), rows(CHECK_GROUP_PG)
    assert group == many
    assert sum(1 for r in group if r[1] == 0) == 3  # the three sends
    assert (
        sorted(r[0] for r in group if r[1] == 1) == ids
    )  # a stamp row per existing customer, none for 10**9
    assert [r[2] for r in group if r[1] == 1 and r[0] == ids[-1]] == [None]  # no profile: an empty stamp
