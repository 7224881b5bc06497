"""The corked httptools protocol answers every response shape intact over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from cadence.api.httpproto import DEFERRED, CorkedHttpToolsProtocol, _Waiting


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app with a small body, an empty 204, and a streamed body in three parts."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/stream":
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        for part in (b"one,", b"two,", b"three"):
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"ok":true}'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@contextmanager
def serving(asgi: Any, **config: Any) -> Iterator[str]:
    """``asgi`` served by uvicorn with the corked protocol on a free loopback port, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(asgi, log_config=None, access_log=False, http=CorkedHttpToolsProtocol, **config)
    )
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def server() -> Iterator[str]:
    with serving(app, lifespan="off") as url:
        yield url


def test_responses_arrive_whole_on_one_keep_alive_connection(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        for _ in range(3):
            r = client.get("/json")
            assert r.status_code == 200 and r.json() == {"ok": True}
            assert r.headers["content-length"] == "11"
        head = client.head("/json")
        assert head.status_code == 200 and head.content == b""
        empty = client.get("/empty")
        assert empty.status_code == 204 and empty.content == b""
        streamed = client.get("/stream")
        assert streamed.status_code == 200 and streamed.text == "one,two,three"
        # The connection is still usable after every shape: nothing was held back or reordered.
        assert client.get("/json").json() == {"ok": True}


def test_connection_close_sends_the_held_head_first(server: str) -> None:
    r = httpx.get(f"{server}/empty", headers={"connection": "close"})
    assert r.status_code == 204
    assert r.headers.get("connection") == "close"


class Answering:
    """An app whose ``POST /now`` the protocol answers at once and ``POST /later`` on the next loop step."""

    def __init__(self) -> None:
        self.post_answers = {"/now": self.now, "/later": self.later}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await app(scope, receive, send)

    def now(self, _scope: dict[str, Any], _body: bytes) -> Any:
        return 200, b'{"at":"once"}', []

    def later(self, scope: dict[str, Any], _body: bytes) -> Any:
        asyncio.get_running_loop().call_soon(scope["reply"], (200, b'{"at":"later"}', []))
        return DEFERRED


def test_answered_requests_leave_no_garbage_for_the_cycle_collector() -> None:
    """Each answered request is freed by reference counting: cycles left for the collector made its
    young collections free thousands of objects at a time, each a pause of the event loop."""
    with serving(Answering(), lifespan="off") as url, httpx.Client(base_url=url) as client:
        assert client.post("/now", content=b"{}").json() == {"at": "once"}
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                assert client.post("/now", content=b"{}").json() == {"at": "once"}
                assert client.post("/later", content=b"{}").json() == {"at": "later"}
            alive = sum(isinstance(o, _Waiting) for o in gc.get_objects())
        finally:
            gc.enable()
    assert alive <= 1  # the connection's last request
