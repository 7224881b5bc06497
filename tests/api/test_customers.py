"""Privacy export/erasure and explicit consent over the API."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.runtime import Runtime
from cadence.store.schema.connectors import outbox
from cadence.store.schema.core import erasures, events, identities, profile_event_stats
from cadence.store.schema.scheduler import audience_members


@pytest.fixture
def client(runtime: Runtime) -> TestClient:
    return TestClient(create_app(runtime=runtime, background=False))


def auth(runtime: Runtime, scope: str) -> dict[str, str]:
    key = create_key(runtime.engine, name=scope, scopes=[scope])
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def total(runtime: Runtime, table: object) -> int:
    with runtime.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table)) or 0)  # type: ignore[arg-type]


def test_consent_route_takes_effect_before_it_answers(client: TestClient, runtime: Runtime) -> None:
    headers = auth(runtime, "ingest")
    response = client.post(
        "/v1/consent", json={"user_id": "u1", "channels": {"email": True, "sms": False}}, headers=headers
    )
    assert response.status_code == 200, response.text
    consent = response.json()["consent"]
    assert consent["email"]["granted"] is True and consent["sms"]["granted"] is False
    bad = client.post("/v1/consent", json={"user_id": "u1", "channels": {"pigeon": True}}, headers=headers)
    assert bad.status_code == 422 and "pigeon" in bad.text
    # A channel in another case is the channel it spells, as ingest reads it; "yes" is not true.
    cased = client.post("/v1/consent", json={"user_id": "u1", "channels": {"SMS": True}}, headers=headers)
    assert cased.status_code == 200 and cased.json()["consent"]["sms"]["granted"] is True, cased.text
    loose = client.post("/v1/consent", json={"user_id": "u1", "channels": {"email": "yes"}}, headers=headers)
    assert loose.status_code == 422 and "channels.email" in loose.text.replace('","', "."), loose.text


def test_export_then_erase_removes_everything_and_records_no_ids(
    client: TestClient, runtime: Runtime
) -> None:
    ingest = auth(runtime, "ingest")
    admin = auth(runtime, "admin")
    batch = {
        "batch": [
            {"type": "track", "anonymousId": "anon-1", "event": "Product Viewed", "messageId": "1"},
            {
                "type": "identify",
                "anonymousId": "anon-1",
                "userId": "erin",
                "traits": {"email": "erin@example.com"},
                "messageId": "2",
            },
            {
                "type": "track",
                "userId": "erin",
                "event": "Order Completed",
                "properties": {"revenue": 9},
                "messageId": "3",
            },
            {"type": "track", "userId": "other", "event": "Order Completed", "messageId": "4"},
        ]
    }
    assert client.post("/v1/batch", json=batch, headers=ingest).status_code == 200
    client.app.state.engine_loop.catch_up()  # type: ignore[attr-defined]
    exported = client.get("/v1/customers/anon-1", headers=admin)
    assert exported.status_code == 200
    data = exported.json()
    assert data["traits"]["email"] == "erin@example.com"
    assert len(data["events"]) == 3 and set(data["aggregates"]) == {"Product Viewed", "Order Completed"}
    assert client.delete("/v1/customers/erin", headers=ingest).status_code == 403
    # What connectors kept of the customer (no cascading key): a dry-run message and an ad-audience
    # membership; the other customer's stay.
    erin, other = data["customer_id"], client.get("/v1/customers/other", headers=admin).json()["customer_id"]
    with runtime.engine.begin() as conn:
        for cid in (erin, other):
            conn.execute(
                outbox.insert().values(
                    idempotency_key=f"k{cid}", channel="email", campaign="c", customer_id=cid,
                    message={"to": "erin@example.com" if cid == erin else "x"}, created_ms=0,
                )
            )  # fmt: skip
            conn.execute(audience_members.insert().values(campaign="ads", customer_id=cid, added_ms=0))
    erased = client.delete("/v1/customers/erin", headers=admin)
    # "ads" is in no rules and has no sends left: no audience cadence could name (a warning says so).
    assert erased.json() == {"events_removed": 3, "identities_removed": 2, "audience_removals_queued": 0}
    assert total(runtime, events) == 1 and total(runtime, identities) == 1
    assert total(runtime, profile_event_stats) == 1
    assert total(runtime, outbox) == 1 and total(runtime, audience_members) == 1
    with runtime.engine.connect() as conn:
        assert conn.scalar(select(outbox.c.customer_id)) == other
        assert conn.scalar(select(audience_members.c.customer_id)) == other
    assert client.get("/v1/customers/erin", headers=admin).status_code == 404
    with runtime.engine.connect() as conn:
        record = conn.execute(select(erasures)).one()
    assert "erin" not in str(tuple(record)) and "anon-1" not in str(tuple(record))
