"""One contract suite, run over every built-in connector against the fake providers.

Each connector is built through the plugin manager (as in production), pointed at the
loopback fakes, and checked for: the request it sends (mapping), 429 then success,
5xx retried, 4xx not retried, idempotent delivery through the send queue, the same
audience request from stored hashes as from the customer's traits, and its webhooks
accepted when signed and refused when forged or malformed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from sqlalchemy import Engine, insert, select

from cadence.connectors.base import OutgoingMessage, WebhookRequest
from cadence.connectors.delivery import Deliverer, DeliveryPolicy, Dispatcher
from cadence.connectors.testing import (
    BUILTINS,
    SENDGRID_SIGNER,
    FakeProviders,
    SigningKey,
    build_connector,
    meta_request,
    sendgrid_request,
    twilio_request,
)
from cadence.engine.sendqueue import enqueue_send
from cadence.errors import PermanentFailure, WebhookRejected
from cadence.store.schema.connectors import outbox
from cadence.store.schema.core import consent, customers, identities, profiles
from cadence.store.schema.sends import sends

CHANNEL = {
    "outbox": "email",
    "sendgrid": "email",
    "sms": "sms",
    "facebook": "facebook",
    "google_ads": "google_ads",
}
TEMPLATE = {
    "outbox": "welcome",
    "sendgrid": "d-5f1c0ffee",
    "sms": "Hi {first_name}, {offer}",
    "facebook": "Purchase",
    "google_ads": None,
}


def message(name: str, i: int, *, key: str | None = None, customer_id: int = 1) -> OutgoingMessage:
    """A message for connector ``name`` with everything any provider needs."""
    return OutgoingMessage(
        send_id=i,
        idempotency_key=key or f"spring:{customer_id}:{i}",
        campaign="spring",
        channel=CHANNEL[name],
        customer_id=customer_id,
        decision_id=f"dec-{i}",
        user_id=f"u{i}",
        template=TEMPLATE[name],
        variables={"offer": "10% off", "value": 12.5, "currency": "EUR", "gclid": f"Cj0KCQgood{i}"},
        recipient={"email": f"user{i}@example.com", "phone": f"+1415555{i:04d}", "first_name": "Ada"},
    )


def check_sendgrid(fake: FakeProviders, batch: list[OutgoingMessage]) -> None:
    [call] = fake.calls_to("sendgrid")
    assert call.path == "/v3/mail/send" and call.status == 202
    assert call.body["template_id"] == "d-5f1c0ffee"
    people = call.body["personalizations"]
    assert [p["to"][0]["email"] for p in people] == [m.recipient["email"] for m in batch]
    assert [p["custom_args"]["decision_id"] for p in people] == [m.decision_id for m in batch]
    assert {p["custom_args"]["campaign"] for p in people} == {"spring"}
    assert people[0]["dynamic_template_data"]["offer"] == "10% off"


def check_sms(fake: FakeProviders, batch: list[OutgoingMessage]) -> None:
    calls = fake.calls_to("twilio")
    assert len(calls) == len(batch) and all(c.status == 201 for c in calls)
    assert [c.body["To"] for c in calls] == [m.recipient["phone"] for m in batch]
    assert calls[0].body["Body"] == "Hi Ada, 10% off" and calls[0].body["From"] == "+15005550006"
    query = dict(parse_qsl(calls[0].body["StatusCallback"].split("?", 1)[1]))
    assert query["decision_id"] == batch[0].decision_id and query["send_key"] == batch[0].idempotency_key


def check_facebook(fake: FakeProviders, batch: list[OutgoingMessage]) -> None:
    [call] = fake.calls_to("facebook")
    assert call.path == "/v21.0/1234567890/events" and call.status == 200
    events = call.body["data"]
    assert [e["event_id"] for e in events] == [m.idempotency_key for m in batch]
    assert all(len(e["user_data"]["em"][0]) == 64 for e in events)
    assert "user0@example.com" not in str(call.body)  # never plain PII
    assert events[0]["custom_data"] == {
        "value": 12.5,
        "currency": "EUR",
        "decision_id": "dec-0",
        "campaign": "spring",
    }


def check_google_ads(fake: FakeProviders, batch: list[OutgoingMessage]) -> None:
    [call] = fake.calls_to("google_ads")
    assert call.path == "/v18/customers/1234567890:uploadClickConversions" and call.status == 200
    assert call.headers["login-customer-id"] == "9990001111"
    conversions = call.body["conversions"]
    assert [c["orderId"] for c in conversions] == [m.idempotency_key for m in batch]
    assert conversions[0]["gclid"] == "Cj0KCQgood0" and conversions[0]["conversionValue"] == 12.5
    assert call.body["partialFailure"] is True


def check_outbox(fake: FakeProviders, batch: list[OutgoingMessage]) -> None:
    assert fake.calls == []


MAPPING: dict[str, Callable[[FakeProviders, list[OutgoingMessage]], None]] = {
    "sendgrid": check_sendgrid,
    "sms": check_sms,
    "facebook": check_facebook,
    "google_ads": check_google_ads,
    "outbox": check_outbox,
}
PROVIDER = {"sendgrid": "sendgrid", "sms": "twilio", "facebook": "facebook", "google_ads": "google_ads"}


def throttle(name: str) -> tuple[int, Any, dict[str, str], float]:
    """(status, body, headers, expected wait) of the provider's documented throttling answer."""
    if name == "sendgrid":
        reset = int(time.time()) + 2
        body = {"errors": [{"field": None, "message": "too many requests"}]}
        return 429, body, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)}, reset - time.time()
    if name == "sms":
        return 429, {"code": 20429, "message": "Too Many Requests", "status": 429}, {"Retry-After": "1"}, 1.0
    if name == "facebook":
        body = {
            "error": {"message": "Application request limit reached", "type": "OAuthException", "code": 4}
        }
        return 400, body, {}, 0.05
    body = {
        "error": {
            "code": 429,
            "message": "Resource has been exhausted",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}],
        }
    }
    return 429, body, {}, 1.0


def bad_request(name: str) -> tuple[int, Any]:
    return {
        "sendgrid": (400, {"errors": [{"field": "from.email", "message": "invalid"}]}),
        "sms": (400, {"code": 21211, "message": "The 'To' number is not valid.", "status": 400}),
        "facebook": (400, {"error": {"message": "Invalid parameter", "type": "OAuthException", "code": 100}}),
        "google_ads": (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "Request contains an invalid argument.",
                    "status": "INVALID_ARGUMENT",
                }
            },
        ),
    }[name]


@dataclass
class FakeTime:
    """A monotonic clock that sleeping moves forward, recording each wait."""

    waits: list[float]
    t: float = 1000.0

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.t += seconds


def deliverer(connector: Any) -> tuple[Deliverer, FakeTime]:
    clock = FakeTime([])
    policy = DeliveryPolicy(max_attempts=4, backoff_base_seconds=0.1, circuit_failure_threshold=10)
    return Deliverer(connector, policy, sleep=clock.sleep, now=clock.now), clock


needs_http = pytest.mark.parametrize("name", [n for n in BUILTINS if n != "outbox"])


@pytest.mark.parametrize("name", BUILTINS)
async def test_send_maps_messages_to_the_provider_request(
    name: str, fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    connector = build_connector(name, fake.base_url, http, None)
    batch = [message(name, i) for i in range(3)]
    results = await connector.send(batch)
    assert [r.idempotency_key for r in results] == [m.idempotency_key for m in batch]
    assert all(r.ok for r in results), results
    MAPPING[name](fake, batch)


@needs_http
async def test_429_is_waited_out_then_sent(name: str, fake: FakeProviders, http: httpx.AsyncClient) -> None:
    connector = build_connector(name, fake.base_url, http, None)
    status, body, headers, expected_wait = throttle(name)
    fake.fail_next(PROVIDER[name], status, body, headers)
    worker, sleeps = deliverer(connector)
    results = await worker.deliver([message(name, 0)])
    assert results[0].ok
    assert len(fake.calls_to(PROVIDER[name])) == 2
    assert len(sleeps.waits) == 1
    assert expected_wait - 0.6 <= sleeps.waits[0] <= expected_wait + 1.2


@needs_http
async def test_5xx_is_retried(name: str, fake: FakeProviders, http: httpx.AsyncClient) -> None:
    connector = build_connector(name, fake.base_url, http, None)
    fake.fail_next(PROVIDER[name], 503, {"error": "upstream unavailable"})
    fake.fail_next(PROVIDER[name], 502, {"error": "bad gateway"})
    worker, sleeps = deliverer(connector)
    results = await worker.deliver([message(name, 0)])
    assert results[0].ok
    assert [c.status for c in fake.calls_to(PROVIDER[name])][-3:-1] == [503, 502]
    assert len(sleeps.waits) == 2 and all(0 <= w <= 0.4 for w in sleeps.waits)


@needs_http
async def test_4xx_is_not_retried(name: str, fake: FakeProviders, http: httpx.AsyncClient) -> None:
    connector = build_connector(name, fake.base_url, http, None)
    status, body = bad_request(name)
    fake.fail_next(PROVIDER[name], status, body)
    worker, sleeps = deliverer(connector)
    with pytest.raises(PermanentFailure) as caught:
        await worker.deliver([message(name, 0)])
    assert len(fake.calls_to(PROVIDER[name])) == 1 and sleeps.waits == []
    assert caught.value.provider_error  # the provider's own words are kept for the dead letter


@pytest.mark.parametrize("name", BUILTINS)
async def test_an_audience_removal_from_stored_hashes_sends_what_the_traits_would(
    name: str, fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    """What erasure stores (``audience_identifiers``) is all the connector needs to remove the customer."""
    connector = build_connector(name, fake.base_url, http, None)
    traits = {"email": " Jo@Example.com", "phone": "+1 (650) 555-1212", "first_name": "Jo"}
    hashed = type(connector).audience_identifiers(traits)
    if hashed is None:  # keeps no audiences
        assert name in ("sendgrid", "sms")
        return
    assert hashed and all(re.fullmatch(r"[0-9a-f]{64}", v) for v in hashed.values())
    variables = {"operation": "remove", "audience_id": "aud-9", "user_list": "customers/1/userLists/2"}
    live = OutgoingMessage(
        send_id=1, idempotency_key="k1", campaign="c", channel=name, customer_id=1,
        variables=variables, recipient=traits,
    )  # fmt: skip
    stored = replace(
        live, send_id=-1, idempotency_key="k2", customer_id=0, recipient={}, hashed_identifiers=hashed
    )
    requests = []
    for msg in (live, stored):
        fake.calls.clear()
        [result] = await connector.send([msg])
        assert result.ok, result.error
        requests.append([(c.method, c.body) for c in fake.calls])
    assert requests[0] == requests[1]
    if name != "outbox":
        assert requests[0] and any(c.method == "DELETE" or "remove" in str(c.body) for c in fake.calls)


def seed_customer(engine: Engine, user_id: str, traits: dict[str, Any], *, sms_opt_in: bool = True) -> int:
    """A customer as the engine loop leaves it: identity, profile traits, consent."""
    with engine.begin() as conn:
        cid = conn.execute(insert(customers).values(created_ms=0)).inserted_primary_key[0]
        conn.execute(insert(identities).values(kind="user", value=user_id, customer_id=cid, first_seen_ms=0))
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
        if sms_opt_in:
            conn.execute(
                insert(consent).values(
                    customer_id=cid, channel="sms", granted=True, source="test", changed_ms=0, event_id=0
                )
            )
    return int(cid)


@pytest.mark.parametrize("name", BUILTINS)
async def test_a_send_is_delivered_once_however_often_it_is_queued_or_dispatched(
    name: str, fake: FakeProviders, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    connector = build_connector(name, fake.base_url, http, sqlite_engine)
    cid = seed_customer(sqlite_engine, "u1", {"email": "ada@example.com", "phone": "+14155550101"})
    variables = {"gclid": "Cj0KCQgood1", "offer": "x", "value": 3}
    for _ in range(3):
        with sqlite_engine.begin() as conn:
            enqueue_send(
                conn,
                key="spring:1:2026-05-01",
                campaign="spring",
                customer_id=cid,
                channel=CHANNEL[name],
                due_ms=0,
                now_ms=0,
                template=TEMPLATE[name],
                variables=variables,
                decision_id="dec-1",
            )
    dispatcher = Dispatcher(engine=sqlite_engine, route=lambda channel, _name: connector)
    first = await dispatcher.drain()
    second = await dispatcher.drain()
    assert (first.sent, second.claimed) == (1, 0)
    with sqlite_engine.connect() as conn:
        row = conn.execute(select(sends.c.status, sends.c.attempts, sends.c.provider_message_id)).one()
        assert row.status == "sent" and row.attempts == 1 and row.provider_message_id
        if name == "outbox":
            assert conn.scalar(select(outbox.c.idempotency_key)) == "spring:1:2026-05-01"
    if name != "outbox":
        assert sum(fake.delivered.values()) == 1


def signed_webhook(name: str) -> WebhookRequest:
    now = int(time.time())
    if name == "sendgrid":
        return sendgrid_request(
            [
                {
                    "email": "ada@example.com",
                    "event": "delivered",
                    "sg_event_id": "ev1",
                    "sg_message_id": "msg1.filter0001",
                    "timestamp": now,
                    "decision_id": "dec-1",
                    "campaign": "spring",
                }
            ]
        )
    if name == "sms":
        return twilio_request(
            {"MessageSid": "SM1", "MessageStatus": "delivered", "To": "+14155550101", "AccountSid": "AC1"},
            query="decision_id=dec-1&campaign=spring",
        )
    return meta_request(
        {
            "object": "page",
            "entry": [
                {
                    "id": "1",
                    "time": now,
                    "changes": [
                        {
                            "field": "leadgen",
                            "value": {"leadgen_id": "L1", "form_id": "F1", "created_time": now},
                        }
                    ],
                }
            ],
        }
    )


def forged_webhook(name: str) -> WebhookRequest:
    if name == "sendgrid":
        return sendgrid_request([{"event": "delivered", "sg_event_id": "ev1"}], signer=SigningKey())
    if name == "sms":
        return twilio_request({"MessageSid": "SM1", "MessageStatus": "delivered"}, token="not-the-token")
    return meta_request({"object": "page", "entry": []}, secret="not-the-secret")


def malformed_webhook(name: str) -> WebhookRequest:
    if name == "sendgrid":
        return sendgrid_request([], body=b'{"not": "an array"}')
    if name == "sms":
        return twilio_request({"AccountSid": "AC1"})
    return meta_request(None, body=b"[1, 2")


WEBHOOKS = ("sendgrid", "sms", "facebook")


@pytest.mark.parametrize("name", BUILTINS)
def test_signed_webhooks_are_accepted_and_parsed(
    name: str, http: httpx.AsyncClient, sqlite_engine: Engine
) -> None:
    connector = build_connector(name, "http://127.0.0.1:9", http, sqlite_engine)
    if name not in WEBHOOKS:
        with pytest.raises(WebhookRejected) as caught:
            connector.verify_webhook(signed_webhook("sendgrid"))
        assert caught.value.status == 404
        return
    request = signed_webhook(name)
    connector.verify_webhook(request)
    [event] = connector.parse_webhook(request)
    assert event.channel == CHANNEL[name] and event.event_id
    if name != "facebook":
        assert event.decision_id == "dec-1" and event.campaign == "spring"


@pytest.mark.parametrize("name", WEBHOOKS)
def test_forged_webhooks_are_refused_with_401(name: str, http: httpx.AsyncClient) -> None:
    connector = build_connector(name, "http://127.0.0.1:9", http, None)
    with pytest.raises(WebhookRejected) as caught:
        connector.verify_webhook(forged_webhook(name))
    assert caught.value.status == 401


@pytest.mark.parametrize("name", WEBHOOKS)
def test_signed_but_malformed_webhooks_are_refused_with_400(name: str, http: httpx.AsyncClient) -> None:
    connector = build_connector(name, "http://127.0.0.1:9", http, None)
    request = malformed_webhook(name)
    connector.verify_webhook(request)  # the signature is fine ...
    with pytest.raises(WebhookRejected) as caught:
        connector.parse_webhook(request)  # ... the content is not
    assert caught.value.status == 400


@pytest.mark.parametrize("name", WEBHOOKS)
def test_unsigned_webhooks_are_refused(name: str, http: httpx.AsyncClient) -> None:
    connector = build_connector(name, "http://127.0.0.1:9", http, None)
    request = signed_webhook(name)
    bare = WebhookRequest(
        method="POST", url=request.url, headers={"content-type": "application/json"}, body=request.body
    )
    with pytest.raises(WebhookRejected) as caught:
        connector.verify_webhook(bare)
    assert caught.value.status == 401


def test_sendgrid_signer_is_a_p256_key() -> None:
    assert SENDGRID_SIGNER.private.curve.name == "secp256r1"
