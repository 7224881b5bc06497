"""The tracker's server side: the script route, body ``writeKey`` auth and CORS on ingestion."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from cadence.api.app import create_app
from cadence.api.security import create_key
from cadence.runtime import Runtime, open_runtime
from cadence.store.schema.core import events

PAGE_ORIGIN = "http://shop.example"
STATIC = Path(__file__).resolve().parents[2] / "cadence" / "api" / "static"


@pytest.fixture
def cors_runtime(runtime: Runtime) -> Runtime:
    settings = runtime.settings.model_copy(update={"cors_origins": [PAGE_ORIGIN]})
    return open_runtime(settings, engine=runtime.engine)


@pytest.fixture
def client(cors_runtime: Runtime) -> TestClient:
    return TestClient(create_app(runtime=cors_runtime, background=False))


@pytest.fixture
def key(runtime: Runtime) -> str:
    return create_key(runtime.engine, name="site", scopes=["ingest"])


def stored(runtime: Runtime) -> list[str]:
    with runtime.engine.connect() as conn:
        return list(conn.scalars(select(events.c.message_id).order_by(events.c.id)))


def test_script_is_served_minified_with_cache_headers_and_revalidates(client: TestClient) -> None:
    first = client.get("/sdk/cadence.js")
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("application/javascript")
    assert "max-age=86400" in first.headers["cache-control"]
    assert first.content == (STATIC / "cadence.min.js").read_bytes()
    assert len(first.content) < 10_000
    etag = first.headers["etag"]
    again = client.get("/sdk/cadence.js", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    changed = client.get("/sdk/cadence.js", headers={"If-None-Match": '"other"'})
    assert changed.status_code == 200
    head = client.head("/sdk/cadence.js")
    assert head.status_code == 200 and head.headers["etag"] == etag


def test_source_is_served_and_gzip_is_used_when_accepted(client: TestClient) -> None:
    source = client.get("/sdk/cadence.src.js", headers={"Accept-Encoding": "identity"})
    assert source.content == (STATIC / "cadence.js").read_bytes()
    assert "content-encoding" not in source.headers
    zipped = client.get("/sdk/cadence.src.js", headers={"Accept-Encoding": "gzip, br"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert int(zipped.headers["content-length"]) < len(source.content) / 2
    assert zipped.content == source.content  # the client decodes it
    assert source.headers["etag"] != client.get("/sdk/cadence.js").headers["etag"]


def test_minified_copy_was_built_from_the_current_source() -> None:
    source_hash = hashlib.sha256((STATIC / "cadence.js").read_bytes()).hexdigest()
    first_line = (STATIC / "cadence.min.js").read_text().splitlines()[0]
    assert source_hash in first_line, "cadence.js changed: run scripts/minify-tracker.sh"


def test_write_key_in_body_authorises_a_beacon_batch(client: TestClient, runtime: Runtime, key: str) -> None:
    batch = {
        "writeKey": key,
        "batch": [{"type": "track", "anonymousId": "a1", "event": "E", "messageId": "b1"}],
    }
    # sendBeacon posts text/plain without an Authorization header.
    response = client.post(
        "/v1/batch", content=json.dumps(batch).encode(), headers={"Content-Type": "text/plain;charset=UTF-8"}
    )
    assert response.status_code == 200, response.text
    assert stored(runtime) == ["b1"]


def test_a_wrong_body_write_key_is_refused(client: TestClient, runtime: Runtime) -> None:
    batch = {"writeKey": "nope", "batch": [{"type": "track", "anonymousId": "a1", "event": "E"}]}
    assert client.post("/v1/batch", json=batch).status_code == 401
    assert client.post("/v1/batch", json={"batch": batch["batch"]}).status_code == 401
    assert stored(runtime) == []


def test_header_key_wins_over_body_write_key(client: TestClient, runtime: Runtime, key: str) -> None:
    decide_only = create_key(runtime.engine, name="d", scopes=["decide"])
    batch = {"writeKey": key, "batch": [{"type": "track", "anonymousId": "a1", "event": "E"}]}
    auth = {"Authorization": "Basic " + base64.b64encode(f"{decide_only}:".encode()).decode()}
    assert client.post("/v1/batch", json=batch, headers=auth).status_code == 403


def test_preflight_is_answered_for_an_allowed_origin_only(client: TestClient) -> None:
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    allowed = client.options("/v1/batch", headers={"Origin": PAGE_ORIGIN, **ask})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == PAGE_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    refused = client.options("/v1/batch", headers={"Origin": "http://evil.example", **ask})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers


def test_cors_headers_only_on_ingestion_routes(client: TestClient, key: str) -> None:
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode(), "Origin": PAGE_ORIGIN}
    body = {"type": "track", "anonymousId": "a", "event": "E"}
    posted = client.post("/v1/track", json=body, headers=auth)
    assert posted.headers["access-control-allow-origin"] == PAGE_ORIGIN
    assert (
        "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": PAGE_ORIGIN}).headers
    )


def test_no_cors_without_the_setting(runtime: Runtime) -> None:
    plain = TestClient(create_app(runtime=runtime, background=False))
    response = plain.options(
        "/v1/batch", headers={"Origin": PAGE_ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in response.headers
