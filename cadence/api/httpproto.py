"""uvicorn's httptools protocol with a response's head and body sent in one write.

uvicorn writes the status line and headers as soon as the app sends ``http.response.start``
and the body as a second ``transport.write``: two system calls and two TCP segments for every
small JSON answer. Profiles of ``cadence serve`` under decision load put about a quarter of a
worker's samples in the first of those writes. :class:`CorkedTransport` holds a response head
until the next write (the body, normally in the same event-loop step) and sends both
together; a head with no body following in the same step (HEAD, 204, ``100 Continue``, a
streamed body not yet produced) goes out on the next loop iteration, and closing the
transport sends what is held first, so nothing is reordered or lost.

It also answers a ``POST`` whose path the app lists in ``post_answers``
(:class:`~cadence.api.app.CadenceAPI`: ``POST /v1/decisions`` previews) without an ASGI
request: the body is gathered in the parser's callbacks and the app's function answers it
at once, with uvicorn's status line and default headers (``date``, ``server``), keep-alive
and access log. uvicorn's per-request task, event, ASGI messages and middleware cost about
as much CPU as the rest of such a request outside ``decide()``. When the function declines
(None: an unknown key, a body that does not validate, ...), when the request
waits behind another on the connection, expects ``100 Continue`` or has a large body, it
is handed to uvicorn as if nothing had happened, body included. The function may also
answer later: it returns :data:`DEFERRED` and calls ``scope["reply"]`` with the answer
(once, on the event loop); until then the connection's next request waits, as uvicorn
queues a pipelined request behind one in progress.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_client_addr

__all__ = ["DEFERRED", "CorkedHttpToolsProtocol", "CorkedTransport"]


class CorkedTransport:
    """A transport proxy that joins a held response head with the write after it.

    >>> class Sink:
    ...     def __init__(self): self.writes = []
    ...     def write(self, data): self.writes.append(bytes(data))
    ...     def close(self): self.writes.append(b"<close>")
    ...     def is_closing(self): return False
    >>> loop = asyncio.new_event_loop()
    >>> sink = Sink()
    >>> t = CorkedTransport(sink, loop)
    >>> t.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\n"); sink.writes
    []
    >>> t.write(b"{}"); sink.writes
    [b'HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\n{}']
    >>> t.write(b"HTTP/1.1 204 No Content\\r\\n\\r\\n"); t.close(); sink.writes[1:]
    [b'HTTP/1.1 204 No Content\\r\\n\\r\\n', b'<close>']
    >>> loop.close()
    """

    __slots__ = ("_flush_scheduled", "_held", "_loop", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._flush_scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hold a response head; send anything else at once, joined to a held head."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
            return
        if data[:5] == b"HTTP/" and data[-4:] == b"\r\n\r\n":
            self._held = bytes(data)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        self._flush_scheduled = False
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        """Send what is held, then close."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


#: Bodies larger than this are handed to uvicorn as they arrive (a decision request is a few hundred bytes).
ANSWER_MAX_BODY = 64 * 1024

Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]

#: What a ``post_answers`` function returns when it will call ``scope["reply"]`` with the answer later.
DEFERRED: Any = object()


class _Waiting:
    """Stands in for uvicorn's request cycle while an answer is deferred (the attributes uvicorn reads)."""

    __slots__ = ("disconnected", "keep_alive", "message_event", "response_complete")

    def __init__(self) -> None:
        self.response_complete = False
        self.keep_alive = True
        self.disconnected = False
        self.message_event = asyncio.Event()


def post_answers_of(app: Any) -> dict[str, Callable[[dict[str, Any], bytes], Answer | None]]:
    """The ``post_answers`` of the first app in uvicorn's middleware chain that has them, or {}.

    >>> class Inner: post_answers = {"/x": None}
    >>> class Outer: app = Inner()
    >>> post_answers_of(Outer()), post_answers_of(object())
    ({'/x': None}, {})
    """
    for _ in range(8):
        found = getattr(app, "post_answers", None)
        if isinstance(found, dict):
            return found
        app = getattr(app, "app", None)
        if app is None:
            break
    return {}


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each small response in one system call (and the app's POST answers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._answers = post_answers_of(self.app)
        self._target: dict[str, Any] | None = None
        #: The body of a request gathered for an answer (None: uvicorn's request cycle has it).
        self._body: bytearray | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Wrap the transport before uvicorn keeps it."""
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        """Gather the body of a POST the app answers itself; start uvicorn's request cycle for anything else."""
        if self._answers and self.parser.get_method() == b"POST":
            target = self._answerable()
            if target is not None:
                self._target = target
                self._body = bytearray()
                return
        super().on_headers_complete()

    def _answerable(self) -> dict[str, Any] | None:
        """A scope for ``post_answers`` when this request may be answered at once, else None."""
        if (
            self.expect_100_continue
            or self.root_path
            or self.pipeline
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.parser.should_upgrade()
        ):
            return None
        if self.access_log and any(name == b"x-forwarded-for" for name, _ in self.headers):
            return None  # uvicorn's proxy-headers middleware gives the access log the forwarded client
        url = httptools.parse_url(self.url)
        if url.query is not None or b"%" in url.path:
            return None
        path = url.path.decode("ascii")
        answer = self._answers.get(path)
        if answer is None:
            return None
        app = self.app
        while getattr(app, "post_answers", None) is not self._answers:
            app = app.app
        return {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": self.headers,
            "client": self.client,
            "app": app,
            "answer": answer,
        }

    def on_body(self, body: bytes) -> None:
        """Gather a body for an answer (handed on when it grows large); else uvicorn's."""
        if self._body is None:
            super().on_body(body)
            return
        self._body += body
        if len(self._body) > ANSWER_MAX_BODY:
            self._hand_on(complete=False)

    def on_message_complete(self) -> None:
        """Answer a gathered request, or hand it on; else uvicorn's."""
        if self._body is None:
            super().on_message_complete()
            return
        target, body = self._target, bytes(self._body)
        assert target is not None
        version = self.parser.get_http_version()
        keep_alive = version != "1.0" and self.parser.should_keep_alive()
        waiting = _Waiting()

        def reply(answer: Answer) -> None:
            target.pop("reply", None)  # see below
            if waiting.response_complete:
                return
            waiting.response_complete = True
            if waiting.disconnected or self.transport.is_closing():
                return
            self._respond(target, *answer, version=version, keep_alive=keep_alive and waiting.keep_alive)

        target["reply"] = reply
        try:
            answer = target.pop("answer")(target, body)
        except Exception:  # noqa: BLE001 - the app's ordinary path answers (and reports) it
            answer = None
        if answer is not DEFERRED:
            # The scope holds ``reply``, which holds the scope: a reference cycle per request, which
            # only the cycle collector frees. Under decision load those cycles (about 16 objects a
            # request, an asyncio.Event among them) made every young collection free some 10,000
            # objects, 5-25 ms on the event loop each (session 12's trace): the commits' p99.
            # Dropped here when answered at once, and by ``reply`` itself when answered later.
            target.pop("reply", None)
        if answer is None:
            waiting.response_complete = True  # a reply that comes anyway (after a failure) is dropped
            self._hand_on(complete=True)
            return
        self._body = self._target = None
        if answer is DEFERRED:
            # A request arriving on this connection meanwhile is queued behind this one (uvicorn's
            # pipeline), and the server's shutdown waits for it (``keep_alive`` cleared: closed after).
            self.cycle = waiting  # type: ignore[assignment]
            return
        waiting.response_complete = True
        self._respond(target, *answer, version=version, keep_alive=keep_alive)

    def _hand_on(self, *, complete: bool) -> None:
        """Start uvicorn's request cycle for the current request with what was gathered of its body."""
        body = self._body
        self._body = self._target = None
        super().on_headers_complete()  # the parser still holds this request's method, URL and version
        if body:
            super().on_body(bytes(body))
        if complete:
            super().on_message_complete()

    def _respond(
        self,
        target: dict[str, Any],
        status: int,
        content: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        version: str,
        keep_alive: bool,
    ) -> None:
        """Write the answer as uvicorn writes a response (in one write), then finish the request as it does."""
        if self.access_log:
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(target),  # type: ignore[arg-type]
                "POST",
                target["path"],
                version,
                status,
            )
        parts = [STATUS_LINE[status]]
        for name, value in (
            *self.server_state.default_headers,
            (b"content-length", str(len(content)).encode()),
            (b"content-type", b"application/json"),
            *headers,
        ):
            parts += (name, b": ", value, b"\r\n")
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", content)
        self.transport.write(b"".join(parts))
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()
