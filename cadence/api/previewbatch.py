"""PostgreSQL previews checked in batches, without blocking the event loop.

A preview's one database read (:class:`~cadence.engine.decision_state.DecisionState`'s
check: the customer's counting sends and the profile's stamp) is a loopback round trip on
PostgreSQL. Made synchronously on the event loop, it blocks the worker for the round trip
and the backend's scheduling (py-spy: half of a worker's samples in psycopg's wait), and
every preview pays one statement. :class:`PreviewBatcher` instead queues the previews of
cached customers, sends **one** statement for all of them
(:data:`~cadence.engine.decision_state.CHECK_MANY_PG`, ``customer_id = ANY(...)``) on a
connection of its own in libpq's non-blocking mode, and goes on serving; when the answer
arrives (the socket is watched by the event loop) it sends the statement for what queued
meanwhile, then decides and answers each request of the batch. At most one statement is
in flight: the busier the worker, the larger the batch.

A request whose cached entry no longer matches the stamp read, or whose customer is not
cached, is read the ordinary way (:meth:`DecisionState.inputs`, synchronous, which
reloads): the answers are the ones the unbatched path gives. If the statement fails (a
broken connection, say), each request of the batch is answered through that path too, and
the connection is opened again for the next batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cadence.api.loopconn import LoopConnection
from cadence.engine.decision_state import CHECK_MANY_PG, CHECK_SESSION_PG, HISTORY_MS, DecisionState
from cadence.store.fast import array_literal

__all__ = ["PreviewBatcher"]

log = logging.getLogger("cadence.api.previews")

_STATEMENT = b"cadence_check_many"

#: What a queued preview is answered with: called with its inputs' customer rows (or None: read them
#: the ordinary way).
Finish = Callable[[dict[int, list[Any]] | None], None]


class PreviewBatcher(LoopConnection):
    """Queue PostgreSQL previews and check their customers with one statement per batch (see the module)."""

    statements = ((_STATEMENT, CHECK_MANY_PG),)
    settings = CHECK_SESSION_PG  # one generic plan of index look-ups (see there)
    what = "a batched preview check"

    def __init__(self, state: DecisionState, *, max_batch: int = 256) -> None:
        super().__init__(state)
        self.max_batch = max_batch
        #: How many statements were sent and how many previews they served (mean batch = their ratio).
        self.batches = 0
        self.previews = 0
        self._pending: list[tuple[int, int, Finish]] = []  # (customer id, oldest send time, finish)
        self._inflight: list[tuple[int, int, Finish]] | None = None
        # The listener's mark before the statement in flight was sent, and its oldest send time: what
        # it read is clean unless notified since (DecisionState.trust_batch).
        self._mark: tuple[int, int] | None = None
        self._since = 0

    def submit(self, customer_id: int, now_ms: int, finish: Finish) -> None:
        """Queue a check of ``customer_id``'s sends after ``now_ms - HISTORY_MS``; ``finish`` gets the rows.

        ``finish`` is called on the event loop, with every customer's rows of the batch (or None
        when the statement failed), and must answer its request itself.
        """
        self._queue((customer_id, now_ms - HISTORY_MS, finish))

    def close(self) -> None:
        """Close the connection (at shutdown); queued previews are answered the ordinary way."""
        waiting = (self._inflight or []) + self._pending
        self._inflight, self._pending = None, []
        self._drop()
        for _, _, finish in waiting:
            finish(None)

    # -- one statement per batch
    def _send(self) -> None:
        self._scheduled = False
        if self._inflight is not None or not self._pending:
            return
        batch = self._pending[: self.max_batch]
        del self._pending[: self.max_batch]
        self._inflight = batch
        try:
            pgconn = self._connection().pgconn
            ids = sorted({customer for customer, _, _ in batch})
            since = min(oldest for _, oldest, _ in batch)
            self._mark, self._since = self.state.mark(), since
            pgconn.send_query_prepared(
                _STATEMENT, [array_literal("bigint", ids).encode(), str(since).encode()]
            )
            self.batches += 1
            self.previews += len(batch)
            self._watch(pgconn)
        except Exception:  # noqa: BLE001 - answered the ordinary way; the next batch reconnects
            log.warning("batched preview check failed to send; reading each the ordinary way", exc_info=True)
            self._fail()

    def _readable(self) -> None:
        from psycopg.pq import ExecStatus

        conn = self._conn
        if conn is None:
            return
        try:
            pgconn = conn.pgconn
            pgconn.consume_input()
            if pgconn.is_busy():
                return  # more of the answer to come
            result = None
            while True:
                res = pgconn.get_result()
                if res is None:
                    break
                result = res
            self._loop.remove_reader(self._fd)
            if result is None or result.status != ExecStatus.TUPLES_OK:
                message = result.error_message if result is not None else b"no result"
                raise RuntimeError(f"batched preview check failed: {message!r}")
            by_customer = self._by_customer(result)
        except Exception:  # noqa: BLE001 - answered the ordinary way; the next batch reconnects
            log.warning("batched preview check failed; reading each the ordinary way", exc_info=True)
            self._fail()
            return
        batch, self._inflight = self._inflight or [], None
        self.state.trust_batch(by_customer, self._since, self._mark)
        # The next batch's statement first (what queued during this round trip), so that PostgreSQL
        # reads it while this worker decides the batch it got.
        self._send()
        for _, _, finish in batch:
            finish(by_customer)

    def _fail(self) -> None:
        batch, self._inflight = self._inflight or [], None
        self._drop()
        for _, _, finish in batch:
            finish(None)
        self._send_later()
