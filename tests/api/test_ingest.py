"""The Segment-compatible ingestion API on both databases."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.runtime import Runtime
from cadence.store.schema.core import events


@pytest.fixture
def client(runtime: Runtime) -> TestClient:
    app = create_app(runtime=runtime, background=False)
    return TestClient(app)


@pytest.fixture
def key(runtime: Runtime) -> str:
    return create_key(runtime.engine, name="writer", scopes=["ingest"])


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def count(runtime: Runtime) -> int:
    with runtime.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(events)) or 0


def test_track_is_stored_once_per_message_id(client: TestClient, runtime: Runtime, key: str) -> None:
    body = {
        "userId": "u1",
        "event": "Order Completed",
        "messageId": "m-1",
        "properties": {"revenue": 80},
    }
    first = client.post("/v1/track", json=body, headers=basic(key))
    again = client.post("/v1/track", json=body, headers=basic(key))
    assert first.status_code == 200 and first.json()["accepted"] == 1
    assert again.status_code == 200 and again.json() == {
        "success": True,
        "accepted": 0,
        "duplicates": 1,
    }
    assert count(runtime) == 1


def test_missing_and_wrong_keys_are_refused(client: TestClient, runtime: Runtime) -> None:
    body = {"userId": "u1", "event": "x"}
    assert client.post("/v1/track", json=body).status_code == 401
    assert client.post("/v1/track", json=body, headers=basic("nope")).status_code == 401
    decide_only = create_key(runtime.engine, name="d", scopes=["decide"])
    assert client.post("/v1/track", json=body, headers=basic(decide_only)).status_code == 403
    assert count(runtime) == 0


def test_malformed_field_is_named(client: TestClient, key: str) -> None:
    response = client.post("/v1/track", json={"userId": "u1"}, headers=basic(key))
    assert response.status_code == 400
    assert response.json()["field"] == "event"


def test_batch_keeps_good_items_and_names_bad_ones(client: TestClient, runtime: Runtime, key: str) -> None:
    batch = {
        "batch": [
            {"type": "track", "userId": "u1", "event": "A", "messageId": "a"},
            {"type": "track", "event": "B", "messageId": "b"},
            {
                "type": "identify",
                "userId": "u1",
                "traits": {"email": "x@example.com"},
                "messageId": "c",
            },
        ]
    }
    response = client.post("/v1/batch", json=batch, headers=basic(key))
    assert response.status_code == 400
    payload = response.json()
    assert payload["accepted"] == 2
    assert payload["rejected"] == [
        {
            "index": 1,
            "field": "batch.1.userId",
            "error": "batch.1.userId: userId or anonymousId is required",
        }
    ]
    assert count(runtime) == 2


def test_a_time_zone_the_profile_cannot_use_is_accepted_with_a_warning(
    client: TestClient, runtime: Runtime, key: str
) -> None:
    """The event is stored (its other traits count), the answer names the field, and a zone spelled
    in the wrong case is taken as the zone it names."""
    from cadence.engine.loop import EngineLoop
    from cadence.engine.profiles import load_profile

    bad = {"userId": "u1", "traits": {"timezone": "Mars/Olympus", "plan": "pro"}}
    r = client.post("/v1/identify", json=bad, headers=basic(key))
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert r.json()["warnings"] == [
        {
            "field": "traits.timezone",
            "warning": "'Mars/Olympus' is not an IANA time zone (such as Europe/Berlin): "
            "the customer's zone is left as it was",
        }
    ]
    batch = {
        "batch": [
            {"type": "track", "userId": "u2", "event": "A", "context": {"timezone": "europe/berlin"}},
            {"type": "track", "userId": "u3", "event": "A", "context": {"timezone": "+05:30"}},
        ]
    }
    r = client.post("/v1/batch", json=batch, headers=basic(key))
    assert r.status_code == 200 and r.json()["accepted"] == 2
    assert [(w["index"], w["field"]) for w in r.json()["warnings"]] == [(1, "batch.1.context.timezone")]
    fine = client.post("/v1/track", json={"userId": "u1", "event": "A"}, headers=basic(key))
    assert "warnings" not in fine.json()
    EngineLoop(runtime).catch_up()
    with runtime.engine.connect() as conn:
        from cadence.engine.identity import resolve_customer

        zones = {
            u: load_profile(conn, resolve_customer(conn, u), now_ms=0).timezone for u in ("u1", "u2", "u3")
        }  # type: ignore[arg-type]
        plan = load_profile(conn, resolve_customer(conn, "u1"), now_ms=0).traits["plan"]  # type: ignore[arg-type]
    assert zones == {"u1": None, "u2": "Europe/Berlin", "u3": None} and plan == "pro"


def test_oversized_batch_is_refused(client: TestClient, runtime: Runtime, key: str) -> None:
    big = {
        "batch": [{"type": "track", "userId": "u", "event": "x" * 100, "properties": {"p": "y" * 1000}}] * 600
    }
    response = client.post("/v1/batch", json=big, headers=basic(key))
    assert response.status_code == 400
    assert response.json()["field"] == "body"
    assert count(runtime) == 0


def test_sent_at_corrects_client_clock_skew(client: TestClient, runtime: Runtime, key: str) -> None:
    body = {
        "userId": "u1",
        "event": "A",
        "messageId": "skew",
        "originalTimestamp": "2000-01-01T00:00:00Z",
        "sentAt": "2000-01-01T00:00:05Z",
    }
    assert client.post("/v1/track", json=body, headers=basic(key)).status_code == 200
    with runtime.engine.connect() as conn:
        ts_ms, received_ms = conn.execute(select(events.c.ts_ms, events.c.received_ms)).one()
    assert received_ms - ts_ms == 5000


def test_request_latency_is_observed_by_route_and_status(client: TestClient, key: str) -> None:
    batch = {"batch": [{"type": "track", "userId": "u1", "event": "A", "messageId": "lat"}]}
    assert client.post("/v1/batch", json=batch, headers=basic(key)).status_code == 200
    assert client.post("/v1/batch", json={"batch": [{}]}, headers=basic(key)).status_code == 400
    text = client.get("/metrics").text
    assert 'cadence_http_request_seconds_count{route="/v1/batch",status="200"} 1.0' in text
    assert 'cadence_http_request_seconds_count{route="/v1/batch",status="400"} 1.0' in text
