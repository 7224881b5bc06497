"""``POST /v1/webhooks/{connector}`` end to end, ``GET /v1/plugins``, and the dispatcher in the app."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert, select

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.connectors.base import WebhookRequest
from cadence.connectors.testing import (
    SigningKey,
    connector_config,
    meta_request,
    sendgrid_request,
    twilio_request,
)
from cadence.engine.sendqueue import enqueue_send
from cadence.runtime import Runtime, open_runtime
from cadence.settings import Settings
from cadence.store.schema.connectors import outbox
from cadence.store.schema.core import customers, events, identities, profiles
from cadence.store.schema.sends import sends

UNREACHABLE = "http://127.0.0.1:9"


@pytest.fixture
def rt(db_engine: Engine) -> Iterator[Runtime]:
    connectors = {name: connector_config(name, UNREACHABLE) for name in ("sendgrid", "sms", "facebook")}
    settings = Settings(
        database_url=str(db_engine.url),
        disable_plugin_autoload=True,
        connectors=connectors,
        _env_file=None,  # type: ignore[call-arg]
    )
    yield open_runtime(settings, engine=db_engine)


@pytest.fixture
def client(rt: Runtime) -> TestClient:
    return TestClient(create_app(runtime=rt, background=False))


def post(client: TestClient, name: str, request: WebhookRequest) -> Any:
    path = f"/v1/webhooks/{name}"
    query = request.url.split("?", 1)[1] if "?" in request.url else ""
    return client.post(
        f"{path}?{query}" if query else path, content=request.body, headers=dict(request.headers)
    )


def customer_with_send(rt: Runtime, *, decision_id: str = "dec-1", channel: str = "email") -> int:
    with rt.engine.begin() as conn:
        cid = int(conn.execute(insert(customers).values(created_ms=0)).inserted_primary_key[0])
        conn.execute(insert(identities).values(kind="user", value="ada", customer_id=cid, first_seen_ms=0))
        enqueue_send(
            conn,
            key="spring:ada:1",
            campaign="spring",
            customer_id=cid,
            channel=channel,
            due_ms=0,
            now_ms=0,
            decision_id=decision_id,
        )
    return cid


def logged(rt: Runtime) -> list[Any]:
    with rt.engine.connect() as conn:
        return list(conn.execute(select(events).order_by(events.c.id)))


def test_sendgrid_events_become_linked_feedback_once(client: TestClient, rt: Runtime) -> None:
    customer_with_send(rt)
    now = int(time.time())
    items = [
        {
            "email": "ada@example.com",
            "event": "delivered",
            "sg_event_id": "e1",
            "timestamp": now,
            "decision_id": "dec-1",
            "campaign": "spring",
            "sg_message_id": "abc.filter1",
        },
        {
            "email": "ada@example.com",
            "event": "open",
            "sg_event_id": "e2",
            "timestamp": now,
            "decision_id": "dec-1",
        },
        {
            "email": "ada@example.com",
            "event": "unsubscribe",
            "sg_event_id": "e3",
            "timestamp": now,
            "decision_id": "dec-1",
        },
        {
            "email": "ada@example.com",
            "event": "spamreport",
            "sg_event_id": "e4",
            "timestamp": now,
            "decision_id": "dec-1",
        },
    ]
    first = post(client, "sendgrid", sendgrid_request(items))
    again = post(client, "sendgrid", sendgrid_request(items))  # the provider retries the same batch
    assert first.status_code == 200 and first.json() == {"accepted": 4, "duplicates": 0}
    assert again.json() == {"accepted": 0, "duplicates": 4}
    rows = logged(rt)
    assert [r.event for r in rows] == ["Email Delivered", "Email Opened", "Unsubscribed", "Spam Reported"]
    assert {r.user_id for r in rows} == {"ada"}
    assert rows[0].message_id == "sendgrid:e1" and rows[0].source == "webhook:sendgrid"
    props = rows[2].payload["properties"]
    assert (props["channel"], props["decision_id"], props["campaign"]) == ("email", "dec-1", "spring")
    assert "ada@example.com" not in str([r.payload for r in rows])  # no address in the log


def test_forged_stale_and_malformed_webhooks_are_refused_and_logged(
    client: TestClient, rt: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    items = [{"event": "open", "sg_event_id": "x", "timestamp": 1}]
    with caplog.at_level(logging.WARNING, logger="cadence.webhooks"):
        forged = post(client, "sendgrid", sendgrid_request(items, signer=SigningKey()))
        stale = post(client, "sendgrid", sendgrid_request(items, ts=int(time.time()) - 86400))
        malformed = post(client, "sendgrid", sendgrid_request([], body=b"{oops"))
        unknown = post(client, "nobody", sendgrid_request(items))
    assert (forged.status_code, stale.status_code, malformed.status_code, unknown.status_code) == (
        401,
        401,
        400,
        404,
    )
    assert "does not match" in forged.json()["error"] and "tolerance" in stale.json()["error"]
    assert any("rejected (401)" in m and "does not match" in m for m in caplog.messages)
    assert logged(rt) == []


def test_twilio_status_callbacks_link_through_the_callback_query(client: TestClient, rt: Runtime) -> None:
    customer_with_send(rt, decision_id="dec-9", channel="sms")
    params = {"MessageSid": "SM1", "MessageStatus": "delivered", "To": "+14155550101", "AccountSid": "AC1"}
    answer = post(client, "sms", twilio_request(params, query="decision_id=dec-9&campaign=spring&send_key=k"))
    assert answer.status_code == 200 and answer.json()["accepted"] == 1
    stale = post(
        client, "sms", twilio_request({**params, "MessageStatus": "sent"}, query="decision_id=dec-9")
    )
    assert stale.json()["accepted"] == 0  # a late "sent" after "delivered" changes nothing
    [row] = logged(rt)
    assert row.event == "Message Delivered" and row.user_id == "ada"
    assert row.payload["properties"]["channel"] == "sms"


def test_twilio_wrong_signature_is_401(client: TestClient) -> None:
    request = twilio_request({"MessageSid": "SM1", "MessageStatus": "delivered"}, token="wrong")
    assert post(client, "sms", request).status_code == 401


def test_meta_handshake_and_signed_leads(client: TestClient, rt: Runtime) -> None:
    ok = client.get(
        "/v1/webhooks/facebook",
        params={"hub.mode": "subscribe", "hub.verify_token": "let-me-in", "hub.challenge": "8931"},
    )
    assert ok.status_code == 200 and ok.text == "8931"
    bad = client.get(
        "/v1/webhooks/facebook",
        params={"hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "1"},
    )
    assert bad.status_code == 403
    lead = {
        "object": "page",
        "entry": [
            {
                "id": "p",
                "time": 1767225600,
                "changes": [
                    {
                        "field": "leadgen",
                        "value": {"leadgen_id": "L7", "form_id": "F1", "created_time": 1767225600},
                    }
                ],
            }
        ],
    }
    assert post(client, "facebook", meta_request(lead)).json()["accepted"] == 1
    assert post(client, "facebook", meta_request(lead, secret="guess")).status_code == 401
    [row] = logged(rt)
    assert (
        row.event == "Converted" and row.anonymous_id.startswith("facebook:") and row.ts_ms == 1767225600000
    )


def test_unknown_recipients_get_a_pseudonymous_id(client: TestClient, rt: Runtime) -> None:
    items = [
        {
            "email": "stranger@example.com",
            "event": "click",
            "sg_event_id": "z1",
            "timestamp": 1,
            "url": "https://shop.example/x",
        }
    ]
    assert post(client, "sendgrid", sendgrid_request(items)).json()["accepted"] == 1
    [row] = logged(rt)
    assert row.event == "Email Link Clicked" and row.user_id is None
    assert row.anonymous_id.startswith("sendgrid:") and "stranger" not in row.anonymous_id
    assert row.payload["properties"]["url"] == "https://shop.example/x"


def test_plugins_route_lists_plugins_and_connectors(client: TestClient, rt: Runtime) -> None:
    assert client.get("/v1/plugins").status_code == 401
    key = create_key(rt.engine, name="ops", scopes=["admin"])
    body = client.get("/v1/plugins", headers={"X-API-Key": key}).json()
    assert [p["name"] for p in body["plugins"]] == ["outbox", "sendgrid", "sms", "facebook", "google_ads"]
    assert all(p["source"] == "builtin" and p["error"] is None for p in body["plugins"])
    by_name = {c["name"]: c for c in body["connectors"]}
    assert by_name["sendgrid"]["enabled"] and not by_name["google_ads"]["enabled"]
    assert by_name["sms"]["capabilities"]["consent_required"] is True


def test_the_app_runs_the_dispatcher_in_the_background(rt: Runtime) -> None:
    with rt.engine.begin() as conn:
        cid = int(conn.execute(insert(customers).values(created_ms=0)).inserted_primary_key[0])
        conn.execute(
            insert(profiles).values(
                customer_id=cid,
                first_seen_ms=0,
                last_seen_ms=0,
                event_count=0,
                traits={},
                updated_event_id=0,
                trait_events={},
            )
        )
        enqueue_send(conn, key="push:1", campaign="app", customer_id=cid, channel="push", due_ms=0, now_ms=0)
    with TestClient(create_app(runtime=rt, background=True)):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with rt.engine.connect() as conn:
                if conn.scalar(select(outbox.c.idempotency_key)):
                    break
            time.sleep(0.05)
    with rt.engine.connect() as conn:
        assert conn.scalar(select(outbox.c.idempotency_key)) == "push:1"


def test_unlinked_unsubscribes_find_the_customer_by_address(client: TestClient, rt: Runtime) -> None:
    with rt.engine.begin() as conn:
        for user, traits in (("ada", {"email": "ada@example.com"}), ("bo", {"phone": "+14155550199"})):
            cid = int(conn.execute(insert(customers).values(created_ms=0)).inserted_primary_key[0])
            conn.execute(insert(identities).values(kind="user", value=user, customer_id=cid, first_seen_ms=0))
            conn.execute(
                insert(profiles).values(
                    customer_id=cid,
                    first_seen_ms=0,
                    last_seen_ms=0,
                    event_count=1,
                    traits=traits,
                    updated_event_id=0,
                    trait_events={},
                )
            )
    email = [{"email": "ada@example.com", "event": "group_unsubscribe", "sg_event_id": "u1", "timestamp": 1}]
    assert post(client, "sendgrid", sendgrid_request(email)).json()["accepted"] == 1
    stop = {
        "MessageSid": "SM5",
        "From": "+14155550199",
        "To": "+15005550006",
        "Body": "STOP",
        "OptOutType": "STOP",
    }
    assert post(client, "sms", twilio_request(stop)).json()["accepted"] == 1
    rows = logged(rt)
    assert [(r.event, r.user_id, r.payload["properties"]["channel"]) for r in rows] == [
        ("Unsubscribed", "ada", "email"),
        ("Unsubscribed", "bo", "sms"),
    ]


def test_a_message_id_shared_by_a_whole_request_does_not_pick_a_customer(
    client: TestClient, rt: Runtime
) -> None:
    with rt.engine.begin() as conn:
        for n in (1, 2):
            cid = int(conn.execute(insert(customers).values(created_ms=0)).inserted_primary_key[0])
            conn.execute(
                insert(identities).values(kind="user", value=f"user{n}", customer_id=cid, first_seen_ms=0)
            )
            enqueue_send(
                conn, key=f"k{n}", campaign="spring", customer_id=cid, channel="email", due_ms=0, now_ms=0
            )
        conn.execute(sends.update().values(provider_message_id="shared"))
    items = [{"event": "open", "sg_event_id": "o1", "timestamp": 1, "sg_message_id": "shared.filter1"}]
    post(client, "sendgrid", sendgrid_request(items))
    [row] = logged(rt)
    assert row.user_id is None and row.anonymous_id.startswith("sendgrid:")


def test_sends_routes_list_requeue_and_mark_in_doubt_sends(client: TestClient, rt: Runtime) -> None:
    with rt.engine.begin() as conn:
        cid = int(conn.execute(insert(customers).values(created_ms=0)).inserted_primary_key[0])
        for key in ("a", "b", "c"):
            enqueue_send(
                conn, key=key, campaign="spring", customer_id=cid, channel="email", due_ms=0, now_ms=0
            )
        conn.execute(
            sends.update().values(status="failed", connector="sendgrid", last_error="in_doubt: crash")
        )
        conn.execute(
            sends.update().where(sends.c.idempotency_key == "c").values(status="sent", last_error=None)
        )
    assert client.get("/v1/sends/in-doubt").status_code == 401
    headers = {"X-API-Key": create_key(rt.engine, name="ops", scopes=["admin"])}
    listed = client.get("/v1/sends/in-doubt", headers=headers).json()["sends"]
    ids = {row["idempotency_key"]: row["id"] for row in listed}
    assert sorted(ids) == ["a", "b"] and all(r["connector"] == "sendgrid" for r in listed)
    with rt.engine.connect() as conn:
        sent_id = conn.scalar(select(sends.c.id).where(sends.c.idempotency_key == "c"))
    answer = client.post("/v1/sends/requeue", json={"ids": [ids["a"], sent_id]}, headers=headers).json()
    assert answer["done"] == [ids["a"]] and "only failed sends" in answer["refused"][str(sent_id)]
    answer = client.post(
        "/v1/sends/mark-sent", json={"ids": [ids["b"]], "provider_message_id": "sg-1"}, headers=headers
    ).json()
    assert answer == {"done": [ids["b"]], "refused": {}}
    with rt.engine.connect() as conn:
        rows = dict(conn.execute(select(sends.c.idempotency_key, sends.c.status)).all())
        pmid = conn.scalar(select(sends.c.provider_message_id).where(sends.c.idempotency_key == "b"))
    assert rows == {"a": "queued", "b": "sent", "c": "sent"} and pmid == "sg-1"
    assert client.get("/v1/sends/in-doubt", headers=headers).json() == {"sends": []}
    assert client.post("/v1/sends/requeue", json={"ids": []}, headers=headers).status_code == 422


def test_a_click_webhook_that_arrives_after_the_order_is_credited_for_it(rt: Runtime) -> None:
    # SendGrid posts its events in batches, often after the shop's order reached cadence:
    # the click that led to the order is still that order's touch.
    from cadence.engine.attribution.online import query_attribution
    from cadence.engine.events import parse_call
    from cadence.engine.ingest import record_events
    from cadence.engine.loop import EngineLoop

    rt = open_runtime(rt.settings.model_copy(update={"rules_paths": []}), engine=rt.engine)  # block "default"
    client = TestClient(create_app(runtime=rt, background=False))
    customer_with_send(rt)
    now = int(time.time())
    order = {
        "type": "track",
        "userId": "ada",
        "event": "Order Completed",
        "messageId": "o-1",
        "timestamp": now,
        "properties": {"revenue": 80},
    }
    record_events(engine=rt.engine, batch=[parse_call(order, received_ms=now * 1000)])
    EngineLoop(rt).catch_up()
    click = {
        "email": "ada@example.com",
        "event": "click",
        "sg_event_id": "c1",
        "timestamp": now - 120,
        "decision_id": "dec-1",
        "campaign": "spring",
        "url": "https://shop.example/spring",
    }
    assert post(client, "sendgrid", sendgrid_request([click])).json()["accepted"] == 1
    EngineLoop(rt).catch_up()
    with rt.engine.connect() as conn:
        got = query_attribution(
            conn, spec="default", models=["last_touch"], window_days=30, group_by="campaign"
        )
    assert [(r["key"], r["value"]) for r in got["last_touch"]] == [("spring", 80.0)]
