"""The decision-state cache and the preview fast path: what changed is seen by the next decision.

Every test runs on SQLite and PostgreSQL. The cache keeps profiles per process and checks
them, with the sends, in one statement per decision; these tests change the database
under a warm cache (a send queued here or by another process, consent withdrawn, traits
changed, a merge, an erasure) and check that the very next decision sees it (on PostgreSQL,
where a preview of a customer nothing was notified for skips the check, the next decision
after the change's notification: ``state.sync()``; test_decisions_notify.py tests that).
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from cadence.api.app import create_app
from cadence.api.security import RateLimiter, create_key
from cadence.engine.campaign import (
    DAY_MS,
    Campaign,
    Cap,
    ChannelPolicy,
    CompiledRuleset,
    GlobalSettings,
    TemplateSpec,
)
from cadence.engine.decision_state import DecisionState
from cadence.engine.decisions_service import make_decision
from cadence.engine.profiles import load_profile
from cadence.engine.sendqueue import enqueue_send
from cadence.runtime import Runtime

# Decided as of this time. The requests say ``"fresh": False``: a decision with ``at`` otherwise waits
# for the engine loop and takes the ordinary route, and these tests are about the fast path's.
AT = "2026-03-04T10:30:00+01:00"
AT_MS = int(datetime.fromisoformat(AT).timestamp() * 1000)

RULES = CompiledRuleset(
    hash="cache-v1",
    campaigns={
        "daily": Campaign(
            name="daily",
            title="Once a week at most",
            priority=1,
            audience=None,
            template=TemplateSpec("t", variables=lambda ctx: {"name": ctx.profile.traits.get("name")}),
            channels=ChannelPolicy(("email", "sms")),
            caps=(Cap(count=1, window_ms=7 * DAY_MS),),
        )
    },
    segments={},
    settings=GlobalSettings(default_zone="Europe/Berlin"),
    aggregates=frozenset(),
)


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


class Api:
    """A test client with keys, the app and helpers for the calls these tests make."""

    def __init__(self, runtime: Runtime) -> None:
        self.app: FastAPI = create_app(runtime=runtime, background=False)
        self.app.state.ruleset = RULES
        self.client = TestClient(self.app)
        self.keys = {
            scope: basic(create_key(runtime.engine, name=scope, scopes=[scope]))
            for scope in ("ingest", "decide", "admin")
        }
        self.state: DecisionState = self.app.state.decision_state

    def identify(self, **body: object) -> None:
        r = self.client.post("/v1/identify", json=body, headers=self.keys["ingest"])
        assert r.status_code == 200, r.text
        self.app.state.engine_loop.catch_up()
        # On PostgreSQL a preview sees another connection's change once notified (the engine loop's
        # commits here): wait for the notification. SQLite: nothing to wait for.
        self.state.sync()

    def decide(self, ref: str, mode: str = "preview", status: int = 200) -> dict[str, object]:
        r = self.client.post(
            "/v1/decisions",
            json={"customer_id": ref, "at": AT, "fresh": False, "mode": mode},
            headers=self.keys["decide"],
        )
        assert r.status_code == status, r.text
        return r.json()  # type: ignore[no-any-return]


def reasons(body: dict[str, object]) -> set[str]:
    return {s["reason"] for s in body["explanation"]["suppressions"]}  # type: ignore[index]


def post_commits(
    app: FastAPI, api: Api, refs: list[str], start: threading.Barrier | None = None
) -> list[httpx.Response]:
    """POST a commit at :data:`AT` for each of ``refs`` to ``app``, all at once on one event loop.

    ``start``: wait for it first (so that two apps' commits arrive together).
    """

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cadence") as client:
            if start is not None:
                start.wait()
            return list(
                await asyncio.gather(
                    *(
                        client.post(
                            "/v1/decisions",
                            json={"customer_id": ref, "at": AT, "fresh": False, "mode": "commit"},
                            headers=api.keys["decide"],
                        )
                        for ref in refs
                    )
                )
            )

    return asyncio.run(run())


def test_a_send_queued_by_a_commit_is_seen_by_the_next_decision(api: Api) -> None:
    first = api.decide("u1")
    assert first["action"] == "send"
    misses = api.state.misses
    assert api.decide("u1")["action"] == "send" and api.state.misses == misses  # served from the cache
    committed = api.decide("u1", mode="commit")
    assert committed["queued"] is True
    after = api.decide("u1")
    assert after["action"] == "none" and "cap" in reasons(after)
    assert after["reasons"] == [  # one line a suppression, naming its channel
        "daily: cap on email (campaign cap 1 per 7d reached)",
        "daily: cap on sms (campaign cap 1 per 7d reached)",
    ]
    assert api.decide("u1", mode="commit")["action"] == "none"  # a commit is capped too
    assert api.state.misses == misses  # the profile did not change: still cached


def test_a_send_queued_by_another_process_is_seen(api: Api, runtime: Runtime) -> None:
    body = api.decide("u1")
    assert body["action"] == "send"
    # Another worker (its own cache, its own transaction) commits a decision for the same customer.
    other = DecisionState(runtime.engine)
    try:
        with runtime.engine.begin() as conn:
            made = make_decision(
                conn=conn,
                ruleset=RULES,
                customer_ref="u1",
                now_ms=AT_MS,
                available_channels=api.app.state.available_channels,
                learners=None,
                mode="commit",
                state=other,
            )
        assert made["queued"] is True
    finally:
        other.close()
    after = api.decide("u1")
    assert after["action"] == "none" and "cap" in reasons(after)
    # ... and a send queued by anything else (an audience push, say) as well, for another customer.
    api.identify(userId="u2", traits={"name": "Bo"})
    cid = api.decide("u2")["customer_id"]
    with runtime.engine.begin() as conn:
        enqueue_send(
            conn, key="push:x", campaign="daily", customer_id=cid, channel="email", due_ms=AT_MS, now_ms=AT_MS
        )
    api.state.sync()  # PostgreSQL: seen once notified
    assert api.decide("u2")["action"] == "none"


def test_consent_withdrawn_and_traits_changed_are_seen(api: Api) -> None:
    assert api.decide("u1")["channel"] == "email"
    r = api.client.post(
        "/v1/consent", json={"user_id": "u1", "channels": {"email": False}}, headers=api.keys["ingest"]
    )
    assert r.status_code == 200, r.text
    after = api.decide("u1")
    assert after["channel"] == "sms" and "consent" in reasons(after)
    api.identify(userId="u1", traits={"name": "Grace"})
    assert api.decide("u1")["variables"] == {"name": "Grace"}


def test_erased_and_merged_customers(api: Api) -> None:
    api.identify(anonymousId="a1", traits={"name": "Anon"})
    anon = api.decide("a1")
    user = api.decide("u1")
    assert anon["customer_id"] != user["customer_id"]
    # An event carrying both ids merges the two customers: the anonymous id now decides for the merged one.
    api.identify(userId="u1", anonymousId="a1")
    merged = api.decide("a1")
    assert merged["customer_id"] == api.decide("u1")["customer_id"]
    assert merged["variables"] == api.decide("u1")["variables"]
    r = api.client.delete("/v1/customers/u1", headers=api.keys["admin"])
    assert r.status_code == 200, r.text
    api.state.sync()  # PostgreSQL: seen once notified
    api.decide("u1", status=404)
    api.decide("a1", status=404)


def test_the_cache_reads_the_profile_load_profile_reads(api: Api, runtime: Runtime) -> None:
    api.identify(userId="u1", traits={"plan": "pro", "consent": {"sms": False}})
    r = api.client.post(
        "/v1/track",
        json={"userId": "u1", "event": "Order Completed", "properties": {"revenue": 12.5}},
        headers=api.keys["ingest"],
    )
    assert r.status_code == 200
    api.app.state.engine_loop.catch_up()
    state = DecisionState(runtime.engine)
    try:
        got = state.inputs("u1", now_ms=AT_MS, ruleset=RULES)
        assert got is not None and not got.cached
        with runtime.engine.connect() as conn:
            expected = load_profile(conn, got.customer_id, now_ms=AT_MS)
        assert got.profile == expected
        assert expected.stats and expected.days and expected.consent == {"sms": False}
        again = state.inputs("u1", now_ms=AT_MS, ruleset=RULES)
        assert again is not None and again.cached and again.profile is got.profile
        assert state.inputs("nobody", now_ms=AT_MS, ruleset=RULES) is None
    finally:
        state.close()


def test_entries_expire_after_the_ttl(runtime: Runtime, api: Api) -> None:
    now = [0.0]
    state = DecisionState(runtime.engine, ttl_seconds=10, clock=lambda: now[0])
    try:
        assert not state.inputs("u1", now_ms=AT_MS, ruleset=RULES).cached  # type: ignore[union-attr]
        now[0] = 9.0
        assert state.inputs("u1", now_ms=AT_MS, ruleset=RULES).cached  # type: ignore[union-attr]
        now[0] = 10.5
        assert not state.inputs("u1", now_ms=AT_MS, ruleset=RULES).cached  # type: ignore[union-attr]
        assert state.misses == 2 and state.hits == 1
    finally:
        state.close()


def test_the_fast_path_answers_like_the_route(api: Api) -> None:
    """Requests the fast path declines get the route's answers; its own answers match the route's."""
    c, keys = api.client, api.keys
    assert c.post("/v1/decisions", json={"customer_id": "u1"}).status_code == 401
    assert c.post("/v1/decisions", json={"customer_id": "u1"}, headers=basic("wrong")).status_code == 401
    assert c.post("/v1/decisions", json={"customer_id": "u1"}, headers=keys["ingest"]).status_code == 403
    bad = c.post("/v1/decisions", json={"customer": "u1"}, headers=keys["decide"])
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "customer_id"]
    assert c.post("/v1/decisions", content=b"{not json", headers=keys["decide"]).status_code == 422
    assert "nobody" in api.decide("nobody", status=404)["detail"]  # type: ignore[operator]
    # The same preview through the fast path and through the route (a batch of one) agree.
    fast = api.decide("u1")
    batch = c.post(
        "/v1/decisions/batch",
        json={"requests": [{"customer_id": "u1", "at": AT, "fresh": False}]},
        headers=keys["decide"],
    ).json()["decisions"][0]
    for field in ("action", "campaign", "channel", "template", "variables", "customer_id", "ruleset_hash"):
        assert fast[field] == batch[field]
    # The rate limit answers 429 with Retry-After, as the route's key check does.
    api.app.state.rate_limiter = RateLimiter(0.01, 1)
    assert api.decide("u1")["action"] == "send"
    limited = c.post("/v1/decisions", json={"customer_id": "u1"}, headers=keys["decide"])
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "rate limit" in limited.json()["detail"]
    # Fast-path requests are counted under the route in the request metrics.
    metrics = c.get("/metrics").text
    assert 'cadence_http_request_seconds_count{route="/v1/decisions",status="200"}' in metrics
    assert 'cadence_http_request_seconds_count{route="/v1/decisions",status="429"}' in metrics


def test_a_request_the_fast_path_hands_on_is_charged_once(api: Api) -> None:
    api.app.state.rate_limiter = RateLimiter(0.001, 3)
    api.decide("nobody", status=404)  # the fast path declines (unknown customer), the route answers
    api.decide("nobody", mode="commit", status=404)  # the same for a commit: nothing was recorded
    assert api.decide("u1")["action"] == "send"  # the third of three tokens
    api.decide("u1", status=429)


def test_concurrent_commits_for_one_customer_queue_one_send(api: Api, runtime: Runtime) -> None:
    """Two workers committing for the same customer at once: the cap (1 a week) lets one send through."""
    api.decide("u1")  # cached in this process; the workers below have their own caches

    def commit(state: DecisionState, start: threading.Barrier) -> str:
        start.wait()
        with runtime.engine.begin() as conn:
            return str(
                make_decision(
                    conn=conn,
                    ruleset=RULES,
                    customer_ref="u1",
                    now_ms=AT_MS,
                    available_channels=api.app.state.available_channels,
                    learners=None,
                    mode="commit",
                    state=state,
                )["action"]
            )

    for _ in range(3):
        states = [DecisionState(runtime.engine), DecisionState(runtime.engine)]
        for state in states:  # warm: the customer is known, as in a worker that decided before
            assert state.inputs("u1", now_ms=AT_MS, ruleset=RULES) is not None
        start = threading.Barrier(2)
        try:
            with ThreadPoolExecutor(2) as pool:
                actions = sorted(pool.map(commit, states, [start, start]))
        finally:
            for state in states:
                state.close()
        assert actions.count("send") <= 1
    with runtime.engine.connect() as conn:
        queued = conn.exec_driver_sql("SELECT count(*) FROM sends WHERE campaign = 'daily'").scalar()
    assert queued == 1


def test_commits_arriving_together_share_a_transaction_and_keep_the_caps(api: Api, runtime: Runtime) -> None:
    """Group commit: concurrent commits are recorded together, each answered after the commit, caps exact."""
    api.identify(userId="u2", traits={"name": "Bo"})
    refs = ["u1", "u2", "nobody"] * 8  # two customers (cap: one send a week each) and an unknown id
    answers = post_commits(api.app, api, refs)
    by_ref: dict[str, list[dict[str, object]]] = {}
    for ref, answer in zip(refs, answers, strict=True):
        assert answer.status_code == (404 if ref == "nobody" else 200), answer.text
        by_ref.setdefault(ref, []).append(answer.json())
    for ref in ("u1", "u2"):
        actions = sorted(str(body["action"]) for body in by_ref[ref])
        assert actions == ["none"] * 7 + ["send"], (ref, actions)
        assert all("cap" in reasons(body) for body in by_ref[ref] if body["action"] == "none")
    groups = api.app.state.decision_groups
    # Every commit went to a group on PostgreSQL (decided in the transaction, after the row lock); on
    # SQLite the 16 for known customers did (decided first, on the event loop, where the unknown ids got
    # their 404). Some shared a transaction.
    assert groups.requests == (24 if api.state.postgres else 16) and groups.groups < groups.requests
    # Every answered decision was committed: each is recorded, the sends queued once per customer.
    with runtime.engine.connect() as conn:
        recorded = conn.exec_driver_sql("SELECT COUNT(*) FROM decisions").scalar()
        queued = conn.exec_driver_sql("SELECT COUNT(*) FROM sends").scalar()
    assert recorded == 16 and queued == 2
    for body in by_ref["u1"]:
        r = api.client.get(f"/v1/decisions/{body['decision_id']}", headers=api.keys["decide"])
        assert r.status_code == 200 and r.json()["action"] == body["action"]


def test_two_workers_grouped_commits_for_one_customer_keep_a_cap_of_one(api: Api, runtime: Runtime) -> None:
    """Two processes' groups commit for the same customer at once: exactly one send passes the cap (1 a week).

    Each app has its own decision cache and its own group writer (as each ``--workers`` process
    has); six commits arrive together at each, so each process records them in one transaction.
    """
    other = create_app(runtime=runtime, background=False)
    other.state.ruleset = RULES
    apps = [api.app, other]
    for app in apps:  # warm: each process knows the customer, so its commits are decided on arrival
        with TestClient(app) as client:
            r = client.post(
                "/v1/decisions",
                json={"customer_id": "u1", "at": AT, "fresh": False},
                headers=api.keys["decide"],
            )
            assert r.status_code == 200 and r.json()["action"] == "send", r.text
    start = threading.Barrier(2)

    def commit_six(app: FastAPI) -> list[dict[str, object]]:
        answers = post_commits(app, api, ["u1"] * 6, start)
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return [a.json() for a in answers]

    try:
        with ThreadPoolExecutor(2) as pool:
            bodies = [body for answers in pool.map(commit_six, apps) for body in answers]
    finally:
        other.state.decision_state.close()
    actions = sorted(str(body["action"]) for body in bodies)
    assert actions == ["none"] * 11 + ["send"], actions
    assert all("cap" in reasons(body) for body in bodies if body["action"] == "none")
    for app in apps:  # each process grouped its commits (fewer transactions than commits)
        groups = app.state.decision_groups
        assert groups.requests == 6 and groups.groups < 6
    with runtime.engine.connect() as conn:
        recorded = conn.exec_driver_sql("SELECT COUNT(*) FROM decisions").scalar()
        queued = conn.exec_driver_sql("SELECT COUNT(*) FROM sends").scalar()
    assert recorded == 12 and queued == 1


def test_a_key_revoked_elsewhere_is_refused_once_the_key_ring_refreshes(api: Api, runtime: Runtime) -> None:
    from cadence.api.security import revoke_key

    assert api.decide("u1")["action"] == "send"
    revoke_key(runtime.engine, name="decide")  # as another process would: this one's key ring is not told
    api.decide("u1")  # still cached here, for at most the key ring's refresh interval
    api.app.state.keyring.invalidate()  # the interval has passed
    assert api.decide("u1", status=401)["detail"] == "unknown or revoked API key"


def test_a_commit_decided_before_its_transaction_is_decided_again_when_its_inputs_changed(
    api: Api, runtime: Runtime
) -> None:
    """prepare_commit decides outside the transaction; commit_prepared records it only if nothing changed."""
    from cadence.engine.decisions_service import DecisionRequestSpec, commit_prepared, prepare_commit

    api.identify(userId="u2", traits={"name": "Bo"})
    channels = api.app.state.available_channels

    def spec(ref: str) -> DecisionRequestSpec:
        return DecisionRequestSpec(
            ruleset=RULES,
            customer_ref=ref,
            now_ms=AT_MS,
            available_channels=channels,
            learners=None,
            mode="commit",
        )

    # Nothing changed in between: recorded exactly as decided.
    early = prepare_commit(spec("u2"), state=api.state)
    assert early.body["action"] == "send"
    with runtime.engine.begin() as conn:
        body = commit_prepared(conn, early, state=api.state)
    assert body is early.body and body["queued"] is True and api.state.revalidated == 1

    # Another worker commits a send for u1 after this decision was made: decided again, capped.
    late = prepare_commit(spec("u1"), state=api.state)
    assert late.body["action"] == "send"
    other = DecisionState(runtime.engine)
    try:
        with runtime.engine.begin() as conn:
            made = make_decision(
                conn=conn,
                ruleset=RULES,
                customer_ref="u1",
                now_ms=AT_MS,
                available_channels=channels,
                learners=None,
                mode="commit",
                state=other,
            )
        assert made["queued"] is True
    finally:
        other.close()
    with runtime.engine.begin() as conn:
        again = commit_prepared(conn, late, state=api.state)
    assert api.state.redecided == 1
    assert again["decision_id"] == late.decision_id and again["action"] == "none" and "cap" in reasons(again)
    with runtime.engine.connect() as conn:
        sends_u1 = conn.exec_driver_sql(
            "SELECT COUNT(*) FROM sends WHERE customer_id = ?".replace(
                "?", "%s" if api.state.postgres else "?"
            ),
            (made["customer_id"],),
        ).scalar()
        row = conn.exec_driver_sql(
            "SELECT action FROM decisions WHERE id = ?".replace("?", "%s" if api.state.postgres else "?"),
            (late.decision_id,),
        ).scalar()
    assert sends_u1 == 1 and row == "none"


def cache_entries(api: Api) -> float:
    """This process's ``cadence_decision_cache_entries`` from ``/metrics``."""
    for line in api.client.get("/metrics").text.splitlines():
        if line.startswith("cadence_decision_cache_entries "):
            return float(line.split()[1])
    raise AssertionError("no cadence_decision_cache_entries in /metrics")


def test_metrics_count_the_customers_cached(api: Api) -> None:
    # A worker with a cold cache sends its commits through the slower thread path: visible here.
    assert cache_entries(api) == 0
    api.decide("u1")
    assert cache_entries(api) == 1
    api.state.forget()
    assert cache_entries(api) == 0


def _alive(runtime: Runtime, pids: list[int], seconds: float = 5.0) -> set[int]:
    """Which of the server processes ``pids`` are still connected (PostgreSQL), once they had ``seconds``
    to leave ``pg_stat_activity`` (a process goes a moment after its client closed); SQLite: none."""
    if runtime.engine.dialect.name != "postgresql" or not pids:
        return set()
    deadline = time.monotonic() + seconds
    while True:
        with runtime.engine.connect() as conn:
            found = {int(p) for p in conn.scalars(text("SELECT pid FROM pg_stat_activity")) if int(p) in pids}
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def test_threads_that_come_and_go_do_not_pile_up_cache_connections(api: Api, runtime: Runtime) -> None:
    """Reads off a transaction use the calling thread's own connection; a thread that ends lets it go.

    A server's worker threads come and go (anyio stops one idle for 10 s): each new one opens a
    connection, and every connection of a thread that ended used to stay open until shutdown,
    until PostgreSQL refused new clients.
    """
    api.identify(userId="t1", traits={"name": "T", "timezone": "Europe/Berlin"})
    state = api.state
    assert state.inputs("t1", now_ms=AT_MS, ruleset=RULES) is not None  # this thread's connection
    before = len(state._raw)
    opened: list[object] = []
    pids: list[int] = []  # their server processes (PostgreSQL)

    def read() -> None:
        assert state.inputs("t1", now_ms=AT_MS, ruleset=RULES) is not None
        opened.append(state._local.held.raw)
        info = getattr(state._local.held.raw, "info", None)  # psycopg
        if info is not None:
            pids.append(int(info.backend_pid))

    for _ in range(12):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    assert len({id(raw) for raw in opened}) == 12  # each thread read on a connection of its own
    assert len(state._raw) == before  # ... and each was let go when its thread ended
    assert all(_closed(raw) for raw in opened)
    assert runtime.engine.dialect.name != "postgresql" or len(set(pids)) == 12
    assert _alive(runtime, pids) == set()  # ... on the server too
    assert state.inputs("t1", now_ms=AT_MS, ruleset=RULES) is not None  # this thread's is still open


def _closed(raw: object) -> bool:
    closed = getattr(raw, "closed", None)  # psycopg
    if closed is not None:
        return bool(closed)
    try:  # sqlite3
        raw.total_changes  # type: ignore[attr-defined]  # noqa: B018
    except sqlite3.ProgrammingError:
        return True
    return False
