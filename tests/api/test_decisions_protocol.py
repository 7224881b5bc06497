"""``POST /v1/decisions`` previews answered by ``cadence serve``'s protocol, over real HTTP on loopback.

The protocol answers a preview without an ASGI request (``CadenceAPI.post_answers``) and
hands everything else to uvicorn with the body it gathered: these tests check that both
give the answers the app gives in-process, on one keep-alive connection, pipelined, and
with ``Connection: close``. They run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from cadence.api.httpproto import DEFERRED
from cadence.runtime import Runtime
from tests.api.test_decisions_cache import AT, Api
from tests.api.test_httpproto import serving

Served = tuple[str, Api, list[int]]


@pytest.fixture
def served(runtime: Runtime) -> Iterator[Served]:
    api = Api(runtime)
    api.identify(userId="u1", traits={"name": "Ada", "timezone": "Europe/Berlin"})
    answered: list[int] = []  # status of each request the protocol answered itself
    answer = api.app.post_answers["/v1/decisions"]  # type: ignore[attr-defined]

    def counted(scope: dict[str, Any], body: bytes) -> Any:
        reply = scope.get("reply")
        if reply is not None:  # an answer given later (a PostgreSQL preview checked in a batch)

            def counting(later: Any) -> None:
                answered.append(later[0])
                reply(later)

            scope["reply"] = counting
        out = answer(scope, body)
        if out is not None and out is not DEFERRED:
            answered.append(out[0])
        return out

    api.app.post_answers["/v1/decisions"] = counted  # type: ignore[attr-defined]
    with serving(api.app) as url:
        yield url, api, answered
    api.state.close()


def test_previews_are_answered_by_the_protocol_as_the_app_answers_them(served: Served) -> None:
    base, api, answered = served
    keys = api.keys
    body = {"customer_id": "u1", "at": AT, "fresh": False}
    in_process = api.client.post("/v1/decisions", json=body, headers=keys["decide"]).json()
    with httpx.Client(base_url=base) as client:
        over_http = client.post("/v1/decisions", json=body, headers=keys["decide"])
        assert over_http.status_code == 200 and answered == [200]
        assert over_http.headers["content-type"] == "application/json"
        assert "date" in over_http.headers and over_http.headers["server"] == "uvicorn"
        got = over_http.json()
        for field in ("action", "campaign", "template", "variables", "customer_id", "ruleset_hash"):
            assert got[field] == in_process[field]
        assert got["decision_id"] != in_process["decision_id"]
        # Declined by the protocol, answered by the app on the same connection, as in-process.
        for headers, payload, status in (
            ({}, body, 401),
            (keys["ingest"], body, 403),
            (keys["decide"], {"customer": "u1"}, 422),
            (keys["decide"], {"customer_id": "nobody", "at": AT, "fresh": False}, 404),
        ):
            r = client.post("/v1/decisions", json=payload, headers=headers)
            assert r.status_code == status, r.text
            assert r.json() == api.client.post("/v1/decisions", json=payload, headers=headers).json()
        committed = client.post("/v1/decisions", json={**body, "mode": "commit"}, headers=keys["decide"])
        assert committed.status_code == 200 and committed.json()["queued"] is True
        after = client.post("/v1/decisions", json=body, headers=keys["decide"]).json()
        assert after["action"] == "none"  # the cap (one a week) counts the send just queued
        large = client.post(  # a body over 64 KB goes to uvicorn as it arrives, and the route answers it
            "/v1/decisions", json={**body, "context": {"note": "x" * 70_000}}, headers=keys["decide"]
        )
        assert large.status_code == 200 and large.json()["action"] == "none"
        assert answered == [200, 200, 200]  # the two previews that succeeded and the commit
        metrics = client.get("/metrics").text
    assert 'cadence_http_request_seconds_count{route="/v1/decisions",status="200"}' in metrics


def _raw_post(auth: str, payload: dict[str, Any], extra_headers: str = "") -> bytes:
    """``POST /v1/decisions`` with ``payload`` as raw HTTP/1.1 bytes (``extra_headers``: lines ending in CRLF)."""
    data = orjson.dumps(payload)
    head = (
        f"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra_headers}\r\n"
    )
    return head.encode() + data


def test_pipelined_requests_and_connection_close_get_whole_answers_in_order(served: Served) -> None:
    base, api, answered = served
    port = int(base.rsplit(":", 1)[1])
    auth = api.keys["decide"]["Authorization"]

    preview = {"customer_id": "u1", "at": AT, "fresh": False}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        # a preview, an unknown customer (handed on), a preview, then one that asks to close
        conn.sendall(
            _raw_post(auth, preview)
            + _raw_post(auth, {"customer_id": "nobody", "at": AT, "fresh": False})
            + _raw_post(auth, preview)
            + _raw_post(auth, preview, "Connection: close\r\n")
        )
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    statuses = []
    rest = received
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        statuses.append(int(lines[0].split()[1]))
        length = next(
            int(v) for k, _, v in (h.partition(b":") for h in lines[1:]) if k.lower() == b"content-length"
        )
        answer, rest = rest[:length], rest[length:]
        assert orjson.loads(answer)
    assert statuses == [200, 404, 200, 200]
    assert b"connection: close" in received.rsplit(b"HTTP/1.1", 1)[1].lower()
    assert answered.count(200) >= 1


def test_a_commit_answered_later_keeps_the_connection_in_order(served: Served) -> None:
    """A commit is answered once its group committed; a request pipelined behind it waits, then sees it."""
    base, api, answered = served
    port = int(base.rsplit(":", 1)[1])
    auth = api.keys["decide"]["Authorization"]

    preview = {"customer_id": "u1", "at": AT, "fresh": False}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(
            _raw_post(auth, {**preview, "mode": "commit"})
            + _raw_post(auth, preview)
            + _raw_post(auth, {**preview, "mode": "commit"})
        )
        received = b""
        while received.count(b"HTTP/1.1 ") < 3 or not received.endswith(b"}"):
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
    bodies = [orjson.loads(part[part.index(b"\r\n\r\n") + 4 :]) for part in received.split(b"HTTP/1.1 ")[1:]]
    assert [b["mode"] for b in bodies] == ["commit", "preview", "commit"]
    # The first commit queued a send; the preview and the second commit behind it count it (cap: one a week).
    assert [b["action"] for b in bodies] == ["send", "none", "none"]
    assert bodies[0]["queued"] is True
    assert 200 in answered  # the first commit was answered by the protocol, not uvicorn's request cycle
