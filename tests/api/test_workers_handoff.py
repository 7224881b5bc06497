"""``cadence serve --workers N``: the parent hands each accepted connection to the workers in turn."""

from __future__ import annotations

import socket
import threading
from typing import Any

import uvicorn

from cadence.api.workers import _handed_server, _Handoff


def _received(end: socket.socket) -> list[int]:
    """The descriptors waiting on a worker's end of its pair (closed once counted)."""
    end.setblocking(False)
    fds: list[int] = []
    while True:
        try:
            _, got, _, _ = socket.recv_fds(end, 64, 64)
        except BlockingIOError:
            return fds
        if not got:
            return fds
        fds.extend(got)


def test_connections_go_to_the_workers_in_turn_and_skip_one_that_is_gone() -> None:
    handoff = _Handoff()
    worker0, worker1 = handoff.pair(0), handoff.pair(1)
    kept = []
    try:
        for _ in range(6):
            conn, other = socket.socketpair()
            kept.append(other)
            assert handoff.hand(conn)
            assert conn.fileno() == -1  # the parent's copy is closed once handed
        first, second = _received(worker0), _received(worker1)
        assert (len(first), len(second)) == (3, 3)
        for fd in first + second:
            socket.socket(fileno=fd).close()
        worker1.close()  # that worker died
        for _ in range(3):
            conn, other = socket.socketpair()
            kept.append(other)
            assert handoff.hand(conn)
        assert len(_received(worker0)) == 3
        worker0.close()
        conn, other = socket.socketpair()
        kept.append(other)
        assert not handoff.hand(conn)  # nobody left to take it
    finally:
        handoff.close()
        for sock in kept:
            sock.close()


async def _hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})


def test_a_worker_serves_a_handed_connection_and_stops_when_the_parent_is_gone() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    config = uvicorn.Config(_hello, lifespan="off", log_config=None, access_log=False)
    server = _handed_server(config, child)
    thread = threading.Thread(target=server.run, daemon=True)  # not the main thread: no signal handlers
    thread.start()
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        accepted, _ = listener.accept()
        socket.send_fds(parent, [b"c"], [accepted.fileno()])
        accepted.close()
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"hello"):
            chunk = client.recv(4096)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        client.close()
        parent.close()  # the parent died: nothing more can come, so the worker stops
        thread.join(15)
        assert not thread.is_alive()
    finally:
        listener.close()
        child.close()
        server.should_exit = True
