"""uvicorn's httptools protocol with a response's head and body sent in one write.

uvicorn writes the status line and headers as soon as the app sends ``http.response.start``
and the body as a second ``transport.write``: two system calls and two TCP segments for every
small JSON answer. Profiles of ``cadence serve`` under decision load put about a quarter of a
worker's samples in the first of those writes. :class:`CorkedTransport` holds a response head
until the next write (the body, normally in the same event-loop step) and sends both
together; a head with no body following in the same step (HEAD, 204, ``100 Continue``, a
streamed body not yet produced) goes out on the next loop iteration, and closing the
transport sends what is held first, so nothing is reordered or lost.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CorkedHttpToolsProtocol", "CorkedTransport"]


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


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each small response in one system call."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Wrap the transport before uvicorn keeps it."""
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]
