"""A PostgreSQL connection the event loop drives without blocking, one unit of work in flight.

What :class:`~cadence.api.previewbatch.PreviewBatcher` (previews checked in batches) and
:class:`~cadence.api.commitpipe.CommitPipeline` (commits recorded in groups) share: requests
queue on the loop; at the end of the loop's iteration the queued ones go out together as one
unit of work (a batch, a group) on a connection of the worker's own, in libpq's non-blocking
mode, its socket watched by the loop; while it is in flight, later requests queue for the next
one (the busier the loop, the larger the unit). A subclass says what it prepares on connecting
and does the sending (``_send``), the reading (``_readable``) and the failing (``_fail``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from cadence.engine.decision_state import DecisionState

__all__ = ["LoopConnection"]

log = logging.getLogger("cadence.api")


class LoopConnection:
    """A non-blocking PostgreSQL connection of the event loop's, and the queue that feeds it (see the module)."""

    #: Statements prepared on connecting: (name, SQL with ``$n`` parameters).
    statements: tuple[tuple[bytes, str], ...] = ()
    #: Session settings (``SET ...``) made on connecting.
    settings: tuple[str, ...] = ()
    #: libpq's pipeline mode: several statements per round trip, one sync each.
    pipeline = False
    #: What a failure to send names in the log.
    what = "a statement"

    def __init__(self, state: DecisionState) -> None:
        self.state = state
        self._pending: list[Any] = []
        self._inflight: Any = None
        self._scheduled = False
        self._conn: Any = None  # a psycopg Connection of our own, used through its libpq handle only
        self._loop: Any = None
        self._fd = -1

    def customer_of(self, customer_ref: str) -> int | None:
        """The customer this path can serve ``customer_ref`` for (cached and fresh), else None."""
        return self.state.fresh_customer_of(customer_ref)

    def _queue(self, item: Any) -> None:
        """Queue ``item`` (on the event loop); the next unit of work is sent at the end of this iteration."""
        self._pending.append(item)
        if self._inflight is None and not self._scheduled:
            self._scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            # At the end of this event-loop iteration: what arrived with this one joins it.
            loop.call_soon(self._send)

    def _connection(self) -> Any:
        if self._conn is None:
            from psycopg.pq import ExecStatus

            proxied = self.state.engine.raw_connection()
            conn = proxied.driver_connection
            proxied.detach()  # ours until closed: the pool neither resets nor hands it out
            conn.autocommit = True  # psycopg's layer stays idle; our statements say BEGIN and COMMIT
            for setting in self.settings:
                conn.execute(f"SET {setting}")
            pgconn = conn.pgconn
            for name, sql in self.statements:
                res = pgconn.prepare(name, sql.encode())
                if res.status != ExecStatus.COMMAND_OK:
                    with contextlib.suppress(Exception):
                        conn.close()
                    raise RuntimeError(f"preparing {name!r} failed: {res.error_message!r}")
            pgconn.nonblocking = 1
            if self.pipeline:
                pgconn.enter_pipeline_mode()
            self._conn = conn
            self._fd = pgconn.socket
        return self._conn

    def _drop(self) -> None:
        """Close the connection (a transaction left open rolls back on the server)."""
        conn, self._conn = self._conn, None
        if self._fd >= 0 and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
                self._loop.remove_writer(self._fd)
        self._fd = -1
        if conn is not None:
            with contextlib.suppress(Exception):  # broken already, most likely; we only let it go
                conn.close()

    def _watch(self, pgconn: Any) -> None:
        """Finish sending when the socket is writable (a full buffer), and read when the answer arrives."""
        if pgconn.flush():
            self._loop.add_writer(self._fd, self._flush)
        self._loop.add_reader(self._fd, self._readable)

    def _flush(self) -> None:
        try:
            if not self._conn.pgconn.flush():
                self._loop.remove_writer(self._fd)
        except Exception:  # noqa: BLE001 - the subclass answers what was in flight
            log.warning("%s failed to send", self.what, exc_info=True)
            self._fail()

    def _by_customer(self, result: Any) -> dict[int, list[Any]]:
        """A check's result (its first column the customer) as each customer's rows, the rest of each.

        Loaded as a psycopg cursor would (the same Python types, by column type).
        """
        from psycopg.adapt import Transformer

        tx = Transformer(self._conn)
        tx.set_pgresult(result)
        by_customer: dict[int, list[Any]] = {}
        for customer, *rest in tx.load_rows(0, result.ntuples, tuple):
            by_customer.setdefault(customer, []).append(rest)
        return by_customer

    def _send_later(self) -> None:
        """After a failure: what queued meanwhile goes out at the end of this iteration (on a new connection)."""
        if self._pending and not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._send)

    def _send(self) -> None:
        raise NotImplementedError

    def _readable(self) -> None:
        raise NotImplementedError

    def _fail(self) -> None:
        raise NotImplementedError
