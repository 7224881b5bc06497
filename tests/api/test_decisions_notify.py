"""PostgreSQL previews without a check: what another connection changes is seen once it is notified.

On PostgreSQL the API's decision cache LISTENs (channel ``cadence_inputs``, the triggers of
migration notify13_0004) and answers a preview of a customer nothing was notified for since its
last check without a round trip. These tests change the database from another connection, wait
for the change's notification (:meth:`DecisionState.sync`: a notification of its own that
arrives after every one committed before), and check that the next preview sees the change;
that a lost listener sends every preview back to the check; and that SQLite is as it was.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from cadence.engine.decision_state import DecisionState
from cadence.engine.sendqueue import enqueue_send
from cadence.runtime import Runtime
from tests.api.test_decisions_cache import AT, AT_MS, Api, reasons
from tests.api.test_httpproto import serving


def listening(api: Api) -> Api:
    if not api.state.postgres:
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    api.state.start_listening()
    assert api.state.listening.wait(10)
    return api


def queue_send(runtime: Runtime, customer_id: Any) -> None:
    """Queue u1 a send of the daily campaign, in a transaction of its own (not this process's commit path)."""
    with runtime.engine.begin() as conn:
        enqueue_send(
            conn,
            key="push:u1",
            campaign="daily",
            customer_id=customer_id,
            channel="email",
            due_ms=AT_MS,
            now_ms=AT_MS,
        )


def clean_preview(api: Api, ref: str) -> dict[str, object]:
    """A preview of ``ref`` checked, then one answered without the check (asserted)."""
    api.decide(ref)
    listened = api.state.listened
    body = api.decide(ref)
    assert api.state.listened == listened + 1, "the second preview should need no check"
    return body


def test_a_send_inserted_by_another_connection_is_seen_once_notified(api: Api, runtime: Runtime) -> None:
    listening(api)
    body = clean_preview(api, "u1")
    assert body["action"] == "send"
    notified = api.state.notified
    queue_send(runtime, body["customer_id"])  # from another connection
    assert api.state.sync()
    assert api.state.notified > notified
    after = api.decide("u1")
    assert after["action"] == "none" and "cap" in reasons(after)


def test_a_status_change_that_stops_a_send_counting_is_seen(api: Api, runtime: Runtime) -> None:
    listening(api)
    cid = clean_preview(api, "u1")["customer_id"]
    queue_send(runtime, cid)  # from another connection
    assert api.state.sync()
    assert api.decide("u1")["action"] == "none"
    clean_preview(api, "u1")  # clean again, with the send counted
    with runtime.engine.begin() as conn:
        conn.execute(text("UPDATE sends SET status = 'cancelled' WHERE customer_id = :c"), {"c": cid})
    assert api.state.sync()
    assert api.decide("u1")["action"] == "send"


def test_a_profile_changed_by_the_engine_loop_is_seen_once_notified(api: Api) -> None:
    listening(api)
    assert clean_preview(api, "u1")["variables"] == {"name": "Ada"}
    api.identify(userId="u1", traits={"name": "Grace"})  # applied by the engine loop, committed
    assert api.state.sync()
    assert api.decide("u1")["variables"] == {"name": "Grace"}


def test_a_merge_is_seen_once_notified(api: Api) -> None:
    listening(api)
    api.identify(anonymousId="a1", traits={"name": "Anon"})
    anon = clean_preview(api, "a1")
    user = clean_preview(api, "u1")
    assert anon["customer_id"] != user["customer_id"]
    api.identify(userId="u1", anonymousId="a1")  # merges the two customers
    assert api.state.sync()
    merged = api.decide("a1")
    assert merged["customer_id"] == api.decide("u1")["customer_id"]


def test_an_erasure_is_seen_once_notified(api: Api) -> None:
    listening(api)
    clean_preview(api, "u1")
    r = api.client.delete("/v1/customers/u1", headers=api.keys["admin"])
    assert r.status_code == 200, r.text
    assert api.state.sync()
    api.decide("u1", status=404)


def test_a_commit_of_this_process_is_seen_by_the_next_preview_without_waiting(api: Api) -> None:
    listening(api)
    clean_preview(api, "u1")
    assert api.decide("u1", mode="commit")["queued"] is True
    after = api.decide("u1")  # no sync: the commit itself told this process's cache
    assert after["action"] == "none" and "cap" in reasons(after)


def test_over_http_a_batched_check_makes_the_customer_clean(api: Api, runtime: Runtime) -> None:
    """Served (the event loop's paths): a changed customer is checked in a batch, then answered clean."""
    listening(api)
    cid = clean_preview(api, "u1")["customer_id"]
    queue_send(runtime, cid)  # from another connection
    assert api.state.sync()
    listened = api.state.listened
    with serving(api.app) as url, httpx.Client(base_url=url) as client:
        answers = [
            client.post(
                "/v1/decisions",
                json={"customer_id": "u1", "at": AT, "fresh": False},
                headers=api.keys["decide"],
            )
            for _ in range(3)
        ]
    assert all(a.status_code == 200 and a.json()["action"] == "none" for a in answers)
    assert api.app.state.preview_batcher.previews == 1  # the first: checked in a batch
    assert api.state.listened == listened + 2  # the others: clean


def test_a_lost_listener_sends_every_preview_back_to_the_check(api: Api, runtime: Runtime) -> None:
    listening(api)
    cid = clean_preview(api, "u1")["customer_id"]
    pid = api.state.listener_pid
    with runtime.engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
    assert api.state.lost.wait(10)
    # A change whose notification nobody hears: the next preview checks, and sees it.
    queue_send(runtime, cid)  # from another connection
    listened = api.state.listened
    after = api.decide("u1")
    assert after["action"] == "none" and "cap" in reasons(after)
    assert api.state.listened == listened
    # Back (a new connection): what was checked before counts for nothing; checked again, it is clean.
    assert api.state.listening.wait(10)
    assert api.state.listener_pid != pid
    clean_preview(api, "u1")


def test_a_cache_dropped_without_close_ends_its_listener(runtime: Runtime) -> None:
    """An app never shut down (a script, a test) must not leave a thread listening for ever."""
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    state = DecisionState(runtime.engine, listen=True)
    state.start_listening()
    assert state.listening.wait(10)
    thread, pid = state._listener, state.listener_pid
    assert thread is not None and thread.is_alive()
    del state
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()
    deadline = time.monotonic() + 10  # and its connection closed (the backend exits soon after)
    while True:
        with runtime.engine.connect() as conn:
            left = conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
            ).scalar()
        if left == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == 0


def test_sqlite_previews_always_check(api: Api, runtime: Runtime) -> None:
    if api.state.postgres:
        pytest.skip("the SQLite half")
    api.state.start_listening()  # nothing to listen to: a no-op
    assert not api.state.listen and not api.state.listening.is_set()
    body = api.decide("u1")
    queue_send(runtime, body["customer_id"])  # from another connection
    assert api.decide("u1")["action"] == "none"  # the very next preview, no waiting
    assert api.state.listened == 0
