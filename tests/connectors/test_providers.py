"""Provider specifics: signatures (known answers, local keys), hashing, batching, partial failures."""

from __future__ import annotations

import hashlib
import time

import httpx
import orjson
import pytest
from sqlalchemy import Engine, select

from cadence.api.routers.webhooks import event_name
from cadence.channels import Feedback
from cadence.connectors.base import OutgoingMessage, ProviderEvent, WebhookRequest, retry_after_seconds
from cadence.connectors.facebook import normalise_user_data
from cadence.connectors.sendgrid import load_public_key, verify_signature
from cadence.connectors.sms import twilio_signature
from cadence.connectors.testing import (
    FakeProviders,
    SigningKey,
    build_connector,
    sendgrid_request,
    twilio_request,
)
from cadence.engine.consent import consent_changes
from cadence.engine.events import LoggedEvent
from cadence.errors import RateLimited, WebhookRejected
from cadence.store.schema.connectors import provider_messages

# SendGrid's published Event Webhook test vector (sendgrid-python / sendgrid-nodejs test suites).
SG_PUBLIC_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3G"
    "Rqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
)
SG_SIGNATURE = (
    "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM="
)
SG_TIMESTAMP = "1600112502"
SG_PAYLOAD = (
    orjson.dumps(
        [
            {
                "email": "hello@world.com",
                "event": "dropped",
                "reason": "Bounced Address",
                "sg_event_id": "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
                "sg_message_id": "LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
                "smtp-id": "<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>",
                "timestamp": 1600112492,
            }
        ]
    )
    + b"\r\n"
)


def test_sendgrid_known_answer_vector_verifies() -> None:
    key = load_public_key(SG_PUBLIC_KEY)
    assert verify_signature(key, payload=SG_PAYLOAD, signature=SG_SIGNATURE, timestamp=SG_TIMESTAMP)
    assert not verify_signature(key, payload=SG_PAYLOAD, signature=SG_SIGNATURE, timestamp="1600112503")
    assert not verify_signature(
        key, payload=SG_PAYLOAD.rstrip(), signature=SG_SIGNATURE, timestamp=SG_TIMESTAMP
    )


def test_sendgrid_known_vector_is_stale_today(http: httpx.AsyncClient) -> None:
    connector = build_connector(
        "sendgrid", "http://127.0.0.1:9", http, None, webhook_public_key=SG_PUBLIC_KEY
    )
    request = WebhookRequest(
        method="POST",
        url="https://x/v1/webhooks/sendgrid",
        headers={
            "x-twilio-email-event-webhook-signature": SG_SIGNATURE,
            "x-twilio-email-event-webhook-timestamp": SG_TIMESTAMP,
        },
        body=SG_PAYLOAD,
    )
    with pytest.raises(WebhookRejected, match="tolerance"):
        connector.verify_webhook(request)
    relaxed = build_connector(
        "sendgrid",
        "http://127.0.0.1:9",
        http,
        None,
        webhook_public_key=SG_PUBLIC_KEY,
        webhook_tolerance_seconds=0,
    )
    relaxed.verify_webhook(request)
    [event] = relaxed.parse_webhook(request)
    assert event.kind is Feedback.FAILED and event.provider_message_id == "LRzXl_NHStOGhQ4kofSm_A"


def test_sendgrid_replayed_webhook_outside_tolerance_is_refused(http: httpx.AsyncClient) -> None:
    connector = build_connector("sendgrid", "http://127.0.0.1:9", http, None)
    old = sendgrid_request([{"event": "open", "sg_event_id": "e"}], ts=int(time.time()) - 3600)
    with pytest.raises(WebhookRejected) as caught:
        connector.verify_webhook(old)
    assert caught.value.status == 401


def test_sendgrid_tampered_body_is_refused(http: httpx.AsyncClient) -> None:
    connector = build_connector("sendgrid", "http://127.0.0.1:9", http, None)
    good = sendgrid_request([{"event": "open", "sg_event_id": "e", "email": "a@b.c"}])
    tampered = WebhookRequest(good.method, good.url, good.headers, good.body.replace(b"open", b"click"))
    connector.verify_webhook(good)
    with pytest.raises(WebhookRejected, match="does not match"):
        connector.verify_webhook(tampered)


def test_sendgrid_events_map_to_feedback(http: httpx.AsyncClient) -> None:
    connector = build_connector("sendgrid", "http://127.0.0.1:9", http, None)
    names = [
        "processed",
        "delivered",
        "open",
        "click",
        "bounce",
        "dropped",
        "spamreport",
        "unsubscribe",
        "group_unsubscribe",
        "deferred",
    ]
    request = sendgrid_request(
        [{"event": n, "sg_event_id": f"e{i}", "timestamp": 1} for i, n in enumerate(names)]
    )
    kinds = [e.kind for e in connector.parse_webhook(request)]
    assert kinds == [
        Feedback.SENT,
        Feedback.DELIVERED,
        Feedback.OPENED,
        Feedback.CLICKED,
        Feedback.BOUNCED,
        Feedback.FAILED,
        Feedback.SPAM_REPORT,
        Feedback.UNSUBSCRIBED,
        Feedback.UNSUBSCRIBED,
    ]


def test_a_sendgrid_machine_open_is_marked_so_the_learners_skip_it(http: httpx.AsyncClient) -> None:
    """SendGrid flags the opens Apple Mail Privacy Protection made (``sg_machine_open``): the open
    is kept (it counts in the funnel) and marked ``machine_open``, which the learners skip."""
    connector = build_connector("sendgrid", "http://127.0.0.1:9", http, None)
    request = sendgrid_request(
        [
            {"event": "open", "sg_event_id": "e1", "timestamp": 1, "sg_machine_open": True},
            {"event": "open", "sg_event_id": "e2", "timestamp": 1, "sg_machine_open": False},
        ]
    )
    machine, person = connector.parse_webhook(request)
    assert machine.kind is person.kind is Feedback.OPENED
    assert machine.properties.get("machine_open") is True and "machine_open" not in person.properties


def test_a_sendgrid_block_is_a_failed_message_not_a_bounced_address(http: httpx.AsyncClient) -> None:
    # SendGrid reports both as event "bounce": type "bounce" is the address refusing mail for
    # good, type "blocked" a receiving server refusing this message (sender reputation,
    # content). A block recorded as "Email Bounced" made the address undeliverable
    # (consent refused with source bounce:, and decisions skip a bounced channel).
    connector = build_connector("sendgrid", "http://127.0.0.1:9", http, None)
    request = sendgrid_request(
        [
            {
                "event": "bounce",
                "type": "bounce",
                "sg_event_id": "b1",
                "timestamp": 1,
                "reason": "550 no user",
            },
            {
                "event": "bounce",
                "type": "blocked",
                "sg_event_id": "b2",
                "timestamp": 1,
                "reason": "421 try later",
            },
        ]
    )
    hard, block = connector.parse_webhook(request)
    assert (hard.kind, hard.properties["type"]) == (Feedback.BOUNCED, "bounce")
    assert (block.kind, block.properties["type"]) == (Feedback.FAILED, "blocked")
    assert block.properties["provider_event"] == "bounce"
    assert consent_changes(feedback_event(hard)) == [("email", False, "bounce:webhook:sendgrid")]
    assert consent_changes(feedback_event(block)) == []


def feedback_event(item: ProviderEvent) -> LoggedEvent:
    """The stored event the webhook router makes of a provider event, as the consent code sees it."""
    name = event_name(item.kind, item.channel)
    properties = {**item.properties, "channel": item.channel}
    return LoggedEvent(
        1, item.event_id, "track", name, "u1", None, 1, 0, "webhook:sendgrid", {"properties": properties}
    )


def message(i: int, **variables: object) -> OutgoingMessage:
    return OutgoingMessage(
        send_id=i,
        idempotency_key=f"k{i}",
        campaign="spring",
        channel="email",
        customer_id=i,
        decision_id=f"d{i}",
        template=str(variables.pop("template", "d-1")),
        variables=variables,
        recipient={"email": f"p{i}@example.com", "phone": f"+1415555{i:04d}", "first_name": "Bo"},
    )


async def test_sendgrid_rate_limit_headers_become_the_wait(
    fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    connector = build_connector("sendgrid", fake.base_url, http, None)
    fake.sendgrid_remaining = 1
    assert (await connector.send([message(1)]))[0].ok
    with pytest.raises(RateLimited) as caught:
        await connector.send([message(2)])
    assert fake.calls[-1].status == 429
    assert 55 <= caught.value.retry_after <= 61  # the fake resets its window 60 s ahead
    assert caught.value.provider_error == {"errors": [{"field": None, "message": "too many requests"}]}


async def test_sendgrid_sandbox_and_plain_content(fake: FakeProviders, http: httpx.AsyncClient) -> None:
    connector = build_connector("sendgrid", fake.base_url, http, None, sandbox_mode=True, asm_group_id=7)
    results = await connector.send([message(1, template="Spring sale", text="20% off")])
    assert results[0].ok
    [call] = fake.calls_to("sendgrid")
    assert call.status == 200 and call.body["mail_settings"] == {"sandbox_mode": {"enable": True}}
    assert call.body["subject"] == "Spring sale" and call.body["content"][0]["value"] == "20% off"
    assert call.body["asm"] == {"group_id": 7}
    assert fake.delivered == {}  # sandbox delivers nothing


def test_twilio_known_answer_vector() -> None:
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675309",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio_signature(url, params, "12345") == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert twilio_signature(url, {**params, "Digits": "9999"}, "12345") != "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def test_twilio_signature_with_explicit_port_is_accepted(http: httpx.AsyncClient) -> None:
    connector = build_connector("sms", "http://127.0.0.1:9", http, None)
    params = {"MessageSid": "SM9", "MessageStatus": "sent"}
    signed_with_port = twilio_request(params, url="https://cadence.example.com:443/v1/webhooks/sms")
    connector.verify_webhook(signed_with_port)


async def test_twilio_stop_error_is_an_opt_out(fake: FakeProviders, http: httpx.AsyncClient) -> None:
    connector = build_connector("sms", fake.base_url, http, None)
    fake.twilio_opted_out.add("+14155550002")
    results = await connector.send([message(2, template="hi")])
    assert not results[0].ok and results[0].opted_out and "21610" in (results[0].error or "")


def test_twilio_statuses_only_move_forward(http: httpx.AsyncClient, sqlite_engine: Engine) -> None:
    connector = build_connector("sms", "http://127.0.0.1:9", http, sqlite_engine)
    seen = []
    for status in ("sent", "delivered", "sent", "sending", "read"):
        request = twilio_request({"MessageSid": "SM42", "MessageStatus": status})
        connector.verify_webhook(request)
        seen.append([e.kind for e in connector.parse_webhook(request)])
    assert seen == [[Feedback.SENT], [Feedback.DELIVERED], [], [], [Feedback.OPENED]]
    with sqlite_engine.connect() as conn:
        assert conn.scalar(select(provider_messages.c.status)) == "read"


def test_twilio_failed_with_21610_is_an_unsubscribe(http: httpx.AsyncClient) -> None:
    connector = build_connector("sms", "http://127.0.0.1:9", http, None)
    request = twilio_request({"MessageSid": "SM7", "MessageStatus": "failed", "ErrorCode": "21610"})
    [event] = connector.parse_webhook(request)
    assert event.kind is Feedback.UNSUBSCRIBED and event.properties["error_code"] == "21610"


def test_meta_user_data_normalisation_and_hashing() -> None:
    data = normalise_user_data(
        {
            "email": " Ada@Example.COM ",
            "phone": "+1 (415) 555-0101",
            "zip": "94107-1234",
            "city": "San Francisco",
            "country": "US",
            "fbp": "fb.1.2.3",
        }
    )
    assert data["em"] == [hashlib.sha256(b"ada@example.com").hexdigest()]
    assert data["ph"] == [hashlib.sha256(b"14155550101").hexdigest()]
    assert data["zp"] == [hashlib.sha256(b"94107").hexdigest()]
    assert data["ct"] == [hashlib.sha256(b"sanfrancisco").hexdigest()]
    assert data["country"] == [hashlib.sha256(b"us").hexdigest()]
    assert data["fbp"] == "fb.1.2.3"
    already = hashlib.sha256(b"x").hexdigest()
    assert normalise_user_data({"email": already})["em"] == [already]


async def test_meta_events_older_than_seven_days_are_split_out(
    fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    connector = build_connector("facebook", fake.base_url, http, None)
    old = message(1, template="Purchase", event_time_ms=int((time.time() - 8 * 86400) * 1000))
    fresh = message(2, template="Purchase", event_time_ms=int((time.time() - 3600) * 1000))
    results = await connector.send([old, fresh])
    assert [r.ok for r in results] == [False, True]
    assert "7 days" in (results[0].error or "")
    [call] = fake.calls_to("facebook")
    assert [e["event_id"] for e in call.body["data"]] == ["k2"]


async def test_meta_custom_audience_add_and_remove(fake: FakeProviders, http: httpx.AsyncClient) -> None:
    connector = build_connector("facebook", fake.base_url, http, None)
    results = await connector.send(
        [message(1, audience_id="aud9"), message(2, audience_id="aud9", operation="remove")]
    )
    assert all(r.ok for r in results)
    add, remove = fake.calls_to("facebook")
    assert (add.method, add.path, remove.method) == ("POST", "/v21.0/aud9/users", "DELETE")
    assert add.body["payload"]["schema"] == ["EMAIL", "PHONE"]
    assert add.body["payload"]["data"][0][0] == hashlib.sha256(b"p1@example.com").hexdigest()


def test_meta_get_handshake(http: httpx.AsyncClient) -> None:
    connector = build_connector("facebook", "http://127.0.0.1:9", http, None)
    ok = WebhookRequest(
        "GET",
        "https://x",
        {},
        b"",
        {"hub.mode": "subscribe", "hub.verify_token": "let-me-in", "hub.challenge": "1158201444"},
    )
    assert connector.webhook_challenge(ok) == "1158201444"
    wrong = WebhookRequest(
        "GET",
        "https://x",
        {},
        b"",
        {"hub.mode": "subscribe", "hub.verify_token": "guess", "hub.challenge": "1"},
    )
    with pytest.raises(WebhookRejected) as caught:
        connector.webhook_challenge(wrong)
    assert caught.value.status == 403


async def test_google_ads_partial_failures_map_back_to_rows(
    fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    connector = build_connector("google_ads", fake.base_url, http, None)
    batch = [message(0, gclid="Cj0good0"), message(1, gclid="bad-click"), message(2, gclid="Cj0good2")]
    results = await connector.send(batch)
    assert [r.ok for r in results] == [True, False, True]
    assert "UNPARSEABLE_GCLID" in (results[1].error or "") and not results[1].retryable
    assert fake.delivered == {"k0": 1, "k2": 1}


async def test_google_ads_customer_match_runs_a_user_data_job(
    fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    connector = build_connector("google_ads", fake.base_url, http, None)
    results = await connector.send([message(1, operation="add"), message(2, operation="add")])
    assert all(r.ok for r in results)
    paths = [c.path for c in fake.calls_to("google_ads")]
    assert paths == [
        "/v18/customers/1234567890/offlineUserDataJobs:create",
        "/v18/customers/1234567890/offlineUserDataJobs/77:addOperations",
        "/v18/customers/1234567890/offlineUserDataJobs/77:run",
    ]
    ops = fake.calls_to("google_ads")[1].body["operations"]
    assert (
        ops[0]["create"]["userIdentifiers"][0]["hashedEmail"] == hashlib.sha256(b"p1@example.com").hexdigest()
    )
    assert (
        ops[0]["create"]["userIdentifiers"][1]["hashedPhoneNumber"]
        == hashlib.sha256(b"+14155550001").hexdigest()
    )


def test_retry_after_prefers_the_header_then_the_reset() -> None:
    assert retry_after_seconds({"Retry-After": "3", "X-RateLimit-Reset": "2000"}, now=1000) == 3.0
    assert retry_after_seconds({"X-RateLimit-Reset": "1010"}, now=1000) == 10.0
    assert retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480) == 10.0


def test_another_accounts_key_does_not_verify(http: httpx.AsyncClient) -> None:
    other = SigningKey()
    connector = build_connector(
        "sendgrid", "http://127.0.0.1:9", http, None, webhook_public_key=other.public_b64
    )
    with pytest.raises(WebhookRejected):
        connector.verify_webhook(sendgrid_request([{"event": "open", "sg_event_id": "x"}]))
    connector.verify_webhook(sendgrid_request([{"event": "open", "sg_event_id": "x"}], signer=other))
