"""Fields cadence cannot use as sent: stored all the same, named in ``warnings``, read sanely (both databases)."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.engine.consent import consent_of
from cadence.engine.identity import resolve_customer
from cadence.engine.loop import EngineLoop
from cadence.runtime import Runtime
from cadence.store.schema.core import events


@pytest.fixture
def client(runtime: Runtime) -> TestClient:
    return TestClient(create_app(runtime=runtime, background=False))


@pytest.fixture
def headers(runtime: Runtime) -> dict[str, str]:
    key = create_key(runtime.engine, name="writer", scopes=["ingest"])
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def stored(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(events)) or 0


def consent(runtime: Runtime, user: str) -> dict[str, tuple[bool, str]]:
    with runtime.engine.connect() as conn:
        cid = resolve_customer(conn, user)
        assert cid is not None, user
        return {ch: (bool(row["granted"]), str(row["source"])) for ch, row in consent_of(conn, cid).items()}


def test_batch_names_each_unusable_field_with_its_index(
    client: TestClient, runtime: Runtime, headers: dict[str, str]
) -> None:
    """Bounce types, campaigns, consent fields and channel names of the wrong type (or an unknown
    name) are answered as warnings in the shape the decision id's are; every event is stored."""
    batch = [
        {"type": "track", "userId": "u1", "event": "Email Bounced", "properties": {"bounce_type": ["soft"]}},
        {"type": "track", "userId": "u1", "event": "Message Sent", "properties": {"channel": "sms", "campaign": ["spring"]}},
        {"type": "identify", "userId": "u1", "traits": {"consent": {"email": "no", "SMS": True}, "unsubscribed": "true"}},
        {"type": "track", "userId": "u1", "event": "Consent Updated", "properties": {"channel": ["sms"], "granted": "false"}},
        {"type": "track", "userId": "u1", "event": "Unsubscribed", "properties": {"channel": "Email"}},
        {"type": "track", "userId": "u1", "event": "Message Clicked", "properties": {"channel": "whatsapp"}},
        {"type": "identify", "userId": "u1", "traits": {"consent": ["email", 5]}},
        {"type": "track", "userId": "u1", "event": "Message Bounced", "properties": {"channel": "sms", "bounce_type": "Soft"}},
        {"type": "track", "userId": "u1", "event": "Message Clicked", "properties": {"channel": "sms", "campaign": "spring"}},
    ]  # fmt: skip
    r = client.post("/v1/batch", json={"batch": batch}, headers=headers)
    assert r.status_code == 200 and r.json()["accepted"] == len(batch), r.text
    said = [(w["index"], w["field"], w["warning"]) for w in r.json()["warnings"]]
    assert [(i, f) for i, f, _w in said] == [
        (0, "batch.0.properties.bounce_type"),
        (1, "batch.1.properties.campaign"),
        (2, "batch.2.traits.consent.email"),
        (2, "batch.2.traits.consent.SMS"),
        (2, "batch.2.traits.unsubscribed"),
        (3, "batch.3.properties.channel"),
        (3, "batch.3.properties.granted"),
        (4, "batch.4.properties.channel"),
        (5, "batch.5.properties.channel"),
        (6, "batch.6.traits.consent.1"),
    ]
    warning = {f.split(".", 2)[2]: w for _i, f, w in said}
    assert warning["properties.bounce_type"] == (
        "an array (['soft']), not 'hard' or 'soft': read as a hard bounce, which marks the address "
        "undeliverable until a new one"
    )
    assert warning["properties.campaign"] == (
        "an array (['spring']), not a campaign name: the event is stored and counted under no campaign"
    )
    assert warning["traits.consent.email"] == (
        "a string ('no'), not true or false: consent for email is left as it was"
    )
    assert warning["traits.consent.SMS"] == "'SMS' is read as 'sms': channel names are lower case"
    assert said[8][2] == (
        "'whatsapp' is not a channel cadence knows (email, sms, push, facebook, google_ads, webhook): "
        "the event is stored and counted under 'whatsapp', which no campaign sends on"
    )
    assert said[9][2] == (
        "a number (5), not a channel name such as 'email': ignored"
    )  # the list's second item

    # One call: the same shape without the index.
    r = client.post(
        "/v1/track",
        json={"userId": "u2", "event": "Email Bounced", "properties": {"bounce_type": 5}},
        headers=headers,
    )
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert [w["field"] for w in r.json()["warnings"]] == ["properties.bounce_type"]
    assert "index" not in r.json()["warnings"][0]
    assert stored(runtime) == len(batch) + 1


def test_what_the_engine_makes_of_such_values_is_sane(
    client: TestClient, runtime: Runtime, headers: dict[str, str]
) -> None:
    """A channel in another case is the channel it spells (an ``Unsubscribed`` with ``"Email"`` used to
    refuse a channel named ``Email``, and email went on); a value of the wrong type is never read as its
    text (no channel ``['sms']``, ``5`` or campaign ``['spring']``); an unreadable bounce type is a hard
    bounce, as an absent one, and ``"Soft"`` is soft."""
    calls = [
        ("track", {"userId": "a", "event": "Unsubscribed", "properties": {"channel": "Email"}}),
        ("identify", {"userId": "b", "traits": {"consent": ["SMS", 5, ["push"]]}}),
        (
            "track",
            {"userId": "c", "event": "Consent Updated", "properties": {"channel": ["sms"], "granted": False}},
        ),
        ("track", {"userId": "c", "event": "Consent Updated", "properties": {"channels": {"Push": False}}}),
        ("track", {"userId": "d", "event": "Email Bounced", "properties": {"bounce_type": ["soft"]}}),
        ("track", {"userId": "e", "event": "Email Bounced", "properties": {"bounce_type": "Soft"}}),
        ("identify", {"userId": "e", "traits": {"plan": "pro"}}),
        (
            "track",
            {
                "userId": "f",
                "event": "Message Sent",
                "properties": {"channel": "SMS", "campaign": ["spring"]},
            },
        ),
    ]
    for call, body in calls:
        r = client.post(f"/v1/{call}", json=body, headers=headers)
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    EngineLoop(runtime).catch_up()

    assert consent(runtime, "a") == {"email": (False, "unsubscribed:api")}
    assert consent(runtime, "b") == {"sms": (True, "identify")}
    assert consent(runtime, "c") == {"push": (False, "api")}
    assert consent(runtime, "d") == {"email": (False, "bounce:api")}
    assert consent(runtime, "e") == {}
    with runtime.engine.connect() as conn:
        daily = conn.execute(text("SELECT campaign, channel, sent FROM campaign_daily WHERE sent > 0")).all()
    assert [tuple(row) for row in daily] == [("", "sms", 1)]


def test_context_parts_that_are_not_objects_are_said_and_no_longer_stop_the_engine_loop(
    client: TestClient, runtime: Runtime, headers: dict[str, str]
) -> None:
    """``context.traits``, ``context.campaign`` and ``context.page`` are objects in the Segment spec;
    sent as a list or a string they were stored and then stopped the loop's profiles or attribution
    (retried, then set aside: the event's traits and touch lost). So was a number as a UTM field."""
    calls = [
        ("identify", {"userId": "u1", "context": {"traits": ["vip"]}, "traits": {"plan": "pro"}}),
        ("page", {"userId": "u1", "context": {"campaign": "spring", "page": "/home"}}),
        ("track", {"userId": "u1", "event": "Ad Clicked", "properties": {"utm_source": 5, "utm_medium": "cpc"}}),
    ]  # fmt: skip
    said = []
    for call, body in calls:
        r = client.post(f"/v1/{call}", json=body, headers=headers)
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        said += [w["field"] for w in r.json().get("warnings", [])]
    assert said == ["context.traits", "context.campaign", "context.page"]
    loop = EngineLoop(runtime)
    loop.catch_up()
    with runtime.engine.connect() as conn:
        assert loop.quarantined(conn)["count"] == 0
        from cadence.engine.profiles import load_profile

        cid = resolve_customer(conn, "u1")
        assert cid is not None and load_profile(conn, cid, now_ms=0).traits["plan"] == "pro"
