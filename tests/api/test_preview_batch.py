"""PostgreSQL previews checked in batches (:mod:`cadence.api.previewbatch`): the same inputs and answers.

The batcher checks many customers with one non-blocking statement on the event loop; these
tests check it against the single check (the same customer, profile and sends, so the same
decision), that an entry changed under it is read again, that a failed statement is read the
ordinary way, and that previews served over HTTP through it answer as the app does. PostgreSQL
only (SQLite previews read a local file and are not batched).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from cadence.api.previewbatch import PreviewBatcher
from cadence.engine.decisions_service import DecisionRequestSpec, make_decision, preview_from
from cadence.engine.sendqueue import enqueue_send
from cadence.runtime import Runtime
from tests.api.test_decisions_cache import AT, AT_MS, DAY_MS, RULES, Api
from tests.api.test_httpproto import serving

USERS = [f"u{i}" for i in range(6)]


@pytest.fixture
def api(runtime: Runtime) -> Iterator[Api]:
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("previews are checked in batches on PostgreSQL only")
    api = Api(runtime)
    for i, user in enumerate(USERS):
        api.identify(userId=user, traits={"name": f"N{i}", "timezone": "Europe/Berlin"})
    ids = {user: api.decide(user)["customer_id"] for user in USERS}  # and every entry is cached
    with runtime.engine.begin() as conn:  # sends: some counting, one too old, one failed
        for n, (user, days_ago, status) in enumerate(
            [
                ("u1", 1, "queued"),
                ("u1", 3, "sent"),
                ("u2", 2, "sent"),
                ("u2", 40, "sent"),
                ("u3", 1, "failed"),
            ]
        ):
            enqueue_send(
                conn,
                key=f"k{n}",
                campaign="daily",
                customer_id=ids[user],
                channel="email",
                due_ms=AT_MS - days_ago * DAY_MS,
                now_ms=AT_MS,
            )
            conn.execute(
                text("UPDATE sends SET status = :status WHERE idempotency_key = :key"),
                {"status": status, "key": f"k{n}"},
            )
    api.state.sync()  # the sends' notifications heard: previews see them
    yield api
    api.state.close()


def batched(batcher: PreviewBatcher, requests: list[tuple[str, int]]) -> list[dict[int, list[Any]] | None]:
    """Submit (customer ref, now) checks in one event-loop iteration; each finish's rows, in order."""

    async def main() -> list[dict[int, list[Any]] | None]:
        loop = asyncio.get_running_loop()
        futures = []
        for ref, now in requests:
            customer = batcher.customer_of(ref)
            assert customer is not None, ref
            future: asyncio.Future[Any] = loop.create_future()
            batcher.submit(customer, now, future.set_result)
            futures.append(future)
        return list(await asyncio.wait_for(asyncio.gather(*futures), 10))

    try:
        return asyncio.run(main())
    finally:
        batcher.close()


def spec(api: Api, ref: str, now_ms: int = AT_MS) -> DecisionRequestSpec:
    return DecisionRequestSpec(
        ruleset=RULES,
        customer_ref=ref,
        now_ms=now_ms,
        available_channels=api.app.state.available_channels,
        learners=None,
    )


def test_one_statement_reads_what_the_single_checks_read(api: Api) -> None:
    state = api.state
    batcher = PreviewBatcher(state)
    # Different times in one batch: each request keeps only the sends its own window counts.
    requests = [(user, AT_MS) for user in USERS] + [("u2", AT_MS - 10 * DAY_MS), ("u1", AT_MS + 2 * DAY_MS)]
    results = batched(batcher, requests)
    assert batcher.batches == 1 and batcher.previews == len(requests)
    for (ref, now), rows in zip(requests, results, strict=True):
        assert rows is not None
        got = state.inputs_from(ref, rows, now_ms=now, ruleset=RULES)
        single = state.inputs(ref, now_ms=now, ruleset=RULES)
        assert got is not None and single is not None and got.cached
        assert (got.customer_id, got.profile, got.history) == (
            single.customer_id,
            single.profile,
            single.history,
        )
        # ... so the same decision, explanation included, for the same decision id.
        with api.app.state.runtime.engine.connect() as conn:
            expected = make_decision(
                conn=conn,
                ruleset=RULES,
                customer_ref=ref,
                now_ms=now,
                available_channels=api.app.state.available_channels,
                learners=None,
                decision_id="d" * 32,
                state=state,
            )
        assert preview_from(spec(api, ref, now), inputs=got, decision_id="d" * 32) == expected
    histories = {ref: len(state.inputs(ref, now_ms=AT_MS, ruleset=RULES).history) for ref in USERS}  # type: ignore[union-attr]
    assert histories == {"u0": 0, "u1": 2, "u2": 1, "u3": 0, "u4": 0, "u5": 0}


def test_a_changed_entry_is_not_served_from_the_batch(api: Api) -> None:
    batcher = PreviewBatcher(api.state)
    customer = batcher.customer_of("u0")
    api.identify(userId="u0", traits={"name": "Changed"})  # the profile's stamp moves
    (rows,) = batched(batcher, [("u0", AT_MS)])
    assert rows is not None and customer in rows
    assert api.state.inputs_from("u0", rows, now_ms=AT_MS, ruleset=RULES) is None
    assert api.decide("u0")["variables"] == {"name": "Changed"}  # the ordinary read reloads it
    assert batcher.customer_of("nobody") is None


def test_a_failed_statement_answers_every_request_of_the_batch_with_none(api: Api, runtime: Runtime) -> None:
    batcher = PreviewBatcher(api.state)
    assert all(rows is not None for rows in batched(batcher, [("u0", AT_MS)]))
    batcher = PreviewBatcher(api.state)
    batcher._connection()  # open it, then end its session from the server's side
    pid = batcher._conn.info.backend_pid
    with runtime.engine.begin() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    results = batched(batcher, [("u0", AT_MS), ("u1", AT_MS)])
    assert results == [None, None]
    # The next batch opens a new connection.
    again = PreviewBatcher(api.state)
    assert all(rows is not None for rows in batched(again, [("u0", AT_MS), ("u1", AT_MS)]))


def test_previews_over_http_are_checked_in_batches_and_answer_as_the_app(api: Api) -> None:
    api.state.stop_listening()  # every preview checks (none is answered clean: test_decisions_notify.py)
    keys = api.keys["decide"]
    bodies = [{"customer_id": user, "at": AT, "fresh": False} for user in USERS * 4] + [
        {"customer_id": "nobody", "at": AT, "fresh": False}
    ]
    expected = [api.client.post("/v1/decisions", json=b, headers=keys) for b in bodies]
    with serving(api.app) as url:

        def post(body: dict[str, Any]) -> httpx.Response:
            with httpx.Client(base_url=url) as client:
                return client.post("/v1/decisions", json=body, headers=keys)

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(post, bodies))
    batcher = api.app.state.preview_batcher
    assert batcher.previews == len(USERS) * 4  # every cached customer's preview; "nobody" is not cached
    for want, have in zip(expected, got, strict=True):
        assert have.status_code == want.status_code, have.text
        a, b = want.json(), have.json()
        if want.status_code != 200:
            assert a == b
            continue
        for field in ("action", "campaign", "template", "variables", "customer_id"):  # (send time: random)
            assert a[field] == b[field]
        assert a["decision_id"] != b["decision_id"]
