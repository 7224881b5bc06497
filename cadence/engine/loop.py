"""The engine loop: consume the event log in order, update derived state, checkpoint.

Each :class:`Subscriber` keeps a piece of derived state (identity, profiles, consent,
learners, attribution). The loop reads events after the lowest subscriber position,
resolves each event's customer, and hands every subscriber the events it has not yet
seen, inside one transaction that also advances that subscriber's checkpoint. A crash
therefore rolls back state and checkpoint together, and a restart resumes exactly
where the last commit left off: replaying yields the same state.

Subscribers whose state lives in memory (river learners) snapshot it with the log
position it reflects and report that position from :meth:`Subscriber.start`; the
loop replays the log after it.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import orjson
from sqlalchemy import Connection, event, func, select

from cadence.clock import now_ms as wall_ms
from cadence.engine.events import LoggedEvent
from cadence.engine.identity import IdentityResolver
from cadence.engine.ingest import append_horizon
from cadence.engine.leader import Leadership, sqlite_shared
from cadence.errors import CadenceError
from cadence.store.db import read_connection
from cadence.store.fast import fetch_rows, rows_of, send, write_rows
from cadence.store.schema.core import checkpoints, engine_quarantine, events

if TYPE_CHECKING:
    from cadence.runtime import Runtime

__all__ = [
    "EngineBehindError",
    "EngineLoop",
    "LoggedEvent",
    "Subscriber",
    "is_data_error",
    "make_subscribers",
]

IDENTITY = "identity"


class EngineBehindError(CadenceError):
    """The engine loop did not apply the log up to a position within the time allowed."""

    def __init__(self, head: int, applied: int, timeout: float, failing: str | None = None) -> None:
        self.head, self.applied, self.timeout = head, applied, timeout
        super().__init__(
            f"the engine loop has not applied the events accepted before this request within {timeout:g} s "
            f"(log at event {head}, applied up to {applied})"
            + (f"; its batches are failing: {failing}" if failing else "")
        )


@dataclass
class LoopFailure:
    """The engine loop's batches failing in a row (cleared by the next batch that commits)."""

    error: str  # the exception, one line
    since_ms: int
    attempts: int
    after_event: int  # the position the failing batch starts after (the lowest subscriber's)
    next_attempt_s: float  # monotonic time of the next try (the retries back off)
    logged_s: float  # monotonic time it was last logged

    def report(self) -> dict[str, Any]:
        """As ``GET /v1/engine`` shows it (``failing``)."""
        return {
            "error": self.error,
            "since": datetime.fromtimestamp(self.since_ms / 1000, tz=UTC).isoformat(timespec="seconds"),
            "attempts": self.attempts,
            "after_event": self.after_event,
        }


#: The longest pause between two tries of a failing batch (it doubles from the poll interval).
MAX_RETRY_SECONDS = 30.0


class _Doorbell:
    """Wakes the leading process's loop from the other processes of one ``cadence serve --workers N``.

    Only the leader applies the log, and an event ingested by another worker otherwise waits
    for the leader's next poll (``engine_poll_seconds``). The workers share the machine: the
    leader listens on a Unix datagram socket named after the database, in the temporary
    directory, and a worker that ingested events sends it a byte (a non-blocking ``sendto``;
    nothing happens when no one listens). Off unless ``CADENCE_WORKERS`` is above 1.
    """

    def __init__(self, url: str, on_ring: Callable[[], None]) -> None:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        self.path = os.path.join(tempfile.gettempdir(), f"cadence-{digest}.wake") if sqlite_shared() else None
        self.on_ring = on_ring
        self._inbox: socket.socket | None = None
        self._inode = 0
        self._outbox: socket.socket | None = None
        self._shut = False

    def listen(self) -> None:
        """Take the socket's name (this process leads); a name left by an earlier leader is replaced."""
        if self.path is None or self._inbox is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            sock.bind(self.path)
            self._inode = os.stat(self.path).st_ino
        except OSError:
            log.warning("cannot listen for other workers' wake-ups at %s", self.path, exc_info=True)
            sock.close()
            return
        sock.settimeout(1.0)
        self._inbox = sock
        threading.Thread(
            target=self._serve, args=(sock,), name="cadence-engine-doorbell", daemon=True
        ).start()

    def _serve(self, sock: socket.socket) -> None:
        while self._inbox is sock:
            try:
                sock.recv(16)
            except TimeoutError:
                continue
            except OSError:
                return
            self.on_ring()

    def ring(self) -> None:
        """Wake the leader, unless this process leads (its own loop was woken already)."""
        if self.path is None or self._inbox is not None or self._shut:
            return
        try:
            if self._outbox is None:
                self._outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._outbox.setblocking(False)
            self._outbox.sendto(b"w", self.path)
        except OSError:
            pass  # no leader listening (yet), or its queue is full: it looks at its next poll

    def close(self) -> None:
        """Stop listening; the name is removed unless another leader took it since."""
        sock, self._inbox = self._inbox, None
        if sock is None:
            return
        sock.close()
        with contextlib.suppress(OSError):
            if self.path is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def shutdown(self) -> None:
        """Stop listening and close the socket the rings go out on (the loop stops)."""
        self._shut = True
        self.close()
        outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.close()


class Subscriber(Protocol):
    """A consumer of the event log. Implementations must be deterministic: the same
    events in the same order give the same state."""

    #: Unique, stable: it names the subscriber's checkpoint row.
    name: str

    # Optional: ``in_memory = True`` for subscribers whose state lives in this process
    # (learners); their position is their own, not the stored checkpoint.

    def start(self, conn: Connection, checkpoint: int) -> int:
        """Load state; return the last event id it reflects.

        ``checkpoint`` is the position the loop stored for this subscriber (0 if none).
        Database-backed subscribers return it unchanged; in-memory ones load their
        latest snapshot and return the position stored with it. Reads only: it runs in
        a read-only transaction (see :meth:`EngineLoop.positions`).
        """
        ...

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        """Apply ``batch`` (ascending ids, all unseen) inside the loop's transaction."""
        ...

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        """Customer ``loser`` was stitched into ``winner``: fold its state into the winner's."""
        ...

    # Optional: ``merged_many(conn, merges)`` folds a batch's ``(winner, loser)`` merges at
    # once, with the result of calling ``merged`` for each in order (the loop prefers it).
    # In one batch every loser is distinct and no winner is also a loser.

    # Optional: ``created(conn, customer_ids)`` is told, before every batch's ``apply`` (and
    # before its merges), which customers that batch's identity stitching created: no stored
    # state counts them yet, so their rows can be inserted without looking for earlier ones.
    # Only the next ``apply`` may rely on it.

    def erased(self, conn: Connection, customer_id: int) -> None:
        """Customer ``customer_id`` was erased: remove or correct everything that counted them."""
        ...

    # Optional: ``erasure_done(conn)`` is called once an erasure told ``erased`` of each of its
    # customers (several when merges joined them), in the same transaction.

    # Optional, for ``in_memory`` subscribers: ``erasure_unmet(conn)`` says whether another process
    # recorded an erasure they have not met; a process that does not lead then loads them again
    # (``start``) before it follows the log further (see EngineLoop.follow_in_memory).

    # Optional: ``erasures_while_idle(engine)`` lets a subscriber meet, while the log is idle, an
    # erasure another process made (the leader's loop calls it each idle poll, no batch running).

    # Optional, for ``in_memory`` subscribers: ``snapshot_owed()`` says (from memory, cheaply)
    # whether their state should be stored now; the loop asks after each batch it committed and
    # while the log is idle, and then calls ``write_snapshot(engine, prepare_snapshot(engine),
    # now_ms=...)`` (see EngineLoop.snapshot_in_memory). ``apply`` itself stores none.

    # Optional: ``prepare(batch)`` may compute, from the events alone (no database), what a later
    # ``apply`` of the very same batch object will need; ``apply`` of any other batch must not
    # use it. The loop calls it on the batch it stitched ahead (PostgreSQL).


# --------------------------------------------------------------------------- the loop

#: Subscribers every loop runs, as "module:factory"; each factory takes the Runtime.
#: Later parts (learners, attribution) add their own line here.
SUBSCRIBER_FACTORIES: tuple[str, ...] = (
    "cadence.engine.profiles:ProfilesSubscriber",
    "cadence.engine.consent:ConsentSubscriber",
    "cadence.engine.attribution.online:AttributionSubscriber",
    "cadence.engine.attribution.materialized:ExposureSubscriber",
    "cadence.engine.campaign_stats:CampaignStatsSubscriber",
    "cadence.engine.assignments:AssignmentsSubscriber",
    "cadence.engine.learning:LearnerSubscriber",
)

#: The most batches in a row after which the collector stays paused (see EngineLoop.run_once).
GC_HOLD = 16
LEADER_LOCK_ID = 0x0CADE9CE  # pg advisory lock held by the process that runs the loop
BATCH_LOCK_ID = 0x0CADE9CF  # pg transaction lock serialising batches across processes
log = logging.getLogger("cadence.engine")


def lock_batches(conn: Connection) -> None:
    """Serialise ``conn``'s transaction with the engine loop's batches in every process: PostgreSQL's
    transaction lock :data:`BATCH_LOCK_ID` (on SQLite ``BEGIN IMMEDIATE`` already holds the write lock)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({int(BATCH_LOCK_ID)})")


#: Those of :data:`SUBSCRIBER_FACTORIES` whose state lives in the serving process (``in_memory``),
#: named here too so that a loop without them does not import them (the learners load river and scipy).
IN_MEMORY_FACTORIES: frozenset[str] = frozenset({"cadence.engine.learning:LearnerSubscriber"})


def make_subscribers(runtime: Runtime, *, in_memory: bool = True) -> list[Subscriber]:
    """Instantiate every subscriber in :data:`SUBSCRIBER_FACTORIES` for ``runtime`` (without
    :data:`IN_MEMORY_FACTORIES` unless ``in_memory``)."""
    built = []
    for spec in SUBSCRIBER_FACTORIES:
        if not in_memory and spec in IN_MEMORY_FACTORIES:
            continue
        module, _, attr = spec.partition(":")
        built.append(getattr(importlib.import_module(module), attr)(runtime))
    return built


def stored_state_loop(runtime: Runtime) -> EngineLoop:
    """A loop over the subscribers whose state is in the database (identity, profiles, consent,
    attribution, ...), not the learners, whose state lives in the serving process.

    What a one-off command applies before it reads derived state (``cadence engine catch-up``,
    ``cadence explain``, ``cadence customers``): with no ``cadence serve`` running, nothing else
    applies the events an import or an API call logged. Safe beside a running server: batches
    run under the database-wide lock. The learners catch up from their snapshot when a server
    starts.
    """
    return EngineLoop(runtime, make_subscribers(runtime, in_memory=False))


class EngineLoop:
    """Applies the event log to every subscriber, in order, with checkpoints.

    :meth:`run_once` processes one batch in one transaction; :meth:`catch_up` runs
    batches until the log is drained; :meth:`start` does it in a background thread,
    woken by :meth:`wake` after ingestion and otherwise polling.
    """

    def __init__(
        self,
        runtime: Runtime,
        subscribers: Sequence[Subscriber] | None = None,
        *,
        batch_size: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.engine = runtime.engine
        self.subscribers = list(subscribers) if subscribers is not None else make_subscribers(runtime)
        names = [s.name for s in self.subscribers]
        if len(set(names)) != len(names) or IDENTITY in names:
            raise ValueError(f"subscriber names must be unique and not {IDENTITY!r}: {names}")
        self.batch_size = batch_size or runtime.settings.engine_batch_size
        self.identity = IdentityResolver()
        #: PostgreSQL: stitch the next batch's identities in each batch (see :meth:`_run_batch`).
        self.look_ahead = True
        self._ahead: _Ahead | None = None
        #: The last batch's events, freed while the server executes the next batch's writes (see _run_batch).
        self._spent: object = None
        self._gc_held = 0  # batches in a row that left the collector paused (see run_once)
        self._positions: dict[str, int] | None = None
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.leadership = Leadership(self.engine, lock_id=LEADER_LOCK_ID, role="engine")
        self._doorbell = _Doorbell(str(self.engine.url), self._wake.set)
        self.processed = 0
        #: Called after each committed batch with the new positions and the batch size.
        self.on_batch: list[Callable[[dict[str, int], int], None]] = []
        #: Set while the background loop's batches fail (see :meth:`_run`), None otherwise.
        self.failure: LoopFailure | None = None

    # -- positions
    def _load_positions(self, conn: Connection) -> dict[str, int]:
        stored = dict(conn.execute(select(checkpoints.c.name, checkpoints.c.position)).all())
        positions = {IDENTITY: int(stored.get(IDENTITY, 0))}
        for sub in self.subscribers:
            positions[sub.name] = int(sub.start(conn, int(stored.get(sub.name, 0))))
        return positions

    def positions(self) -> dict[str, int]:
        """The last event id applied, per subscriber (and ``identity``).

        Loaded (with the in-memory subscribers' snapshots) in a read-only transaction: on SQLite
        a write transaction would hold the database's write lock while the learners' snapshot is
        read and unpickled (up to 14 ms measured in a worker following the leader's snapshots),
        and every commit of every worker waited for it. No subscriber writes in ``start``.
        """
        with self._lock:
            if self._positions is None:
                with read_connection(self.engine) as conn, conn.begin():
                    self._positions = self._load_positions(conn)
            return dict(self._positions)

    def lag(self) -> int:
        """How many events are in the log after the slowest subscriber's position."""
        low = min(self.positions().values())
        with read_connection(self.engine) as conn:
            return _events_after(conn, low)

    def status(self) -> dict[str, Any]:
        """Positions, lag and role, as ``GET /v1/engine`` reports them.

        ``positions``: the database-backed subscribers' stored checkpoints, and this process's
        in-memory ones (a follower's learners: as far as it applied the log to them). ``lag``: the events
        after :meth:`applied`, those a decision here does not see yet. ``leader``: whether this
        process's loop applies the log (a follower's positions move only as the leader's do).
        ``failing``: while this process's batches fail, :meth:`LoopFailure.report`; else None.
        """
        cached = self.positions()
        with read_connection(self.engine) as conn, conn.begin():
            positions = self._stored_positions(conn, cached)
            lag = _events_after(conn, self.applied(conn))
            quarantined = self.quarantined(conn)
        return {
            "positions": positions,
            "lag": lag,
            "running": self.running,
            "leader": self.running and self.leadership.held,
            "failing": self.failure.report() if self.failure is not None else None,
            "quarantined": quarantined,
        }

    def applied(self, conn: Connection) -> int:
        """The last event id whose effects a decision in this process reads.

        The database-backed subscribers' stored checkpoints (identity, profiles, consent, ...), and
        the in-memory ones' (the learners) where this process's background loop applies the
        log to them (it leads). A follower's learners apply the log after the leader's
        positions (:meth:`follow_in_memory`): :meth:`wait_applied` brings them up to date once
        these positions are reached.
        """
        low = self._stored_applied(conn)
        cached = self._positions if self._thread is not None and self.leadership.held else None
        if cached is not None:
            for sub in self.subscribers:
                if getattr(sub, "in_memory", False) and sub.name in cached:
                    low = min(low, cached[sub.name])
        return low

    def _stored_applied(self, conn: Connection) -> int:
        """The lowest stored checkpoint of identity and the database-backed subscribers: how far the
        leading loop has applied the log to the state kept in the database."""
        stored = dict(conn.execute(select(checkpoints.c.name, checkpoints.c.position)).all())
        low = int(stored.get(IDENTITY, 0))
        for sub in self.subscribers:
            if not getattr(sub, "in_memory", False):
                low = min(low, int(stored.get(sub.name, 0)))
        return low

    def behind(self) -> tuple[int, int] | None:
        """``(the log's last event id, :meth:`applied`)`` when the second is behind, else None."""
        with read_connection(self.engine) as conn, conn.begin():
            head = int(conn.scalar(select(func.max(events.c.id))) or 0)
            at = self.applied(conn)
        return (head, at) if at < head else None

    def wait_applied(self, *, timeout: float, inline: bool = False) -> None:
        """Return once the log as it is now (every event accepted so far) is applied; see :meth:`applied`.

        A request that must see the events its client sent before it (``fresh`` decisions)
        calls this. ``inline``: no background loop runs in this process (an app made without
        background work): apply the log here instead of waiting. Otherwise the loop is woken
        and polled; :class:`EngineBehindError` after ``timeout`` seconds. Another process's
        ingestion does not wake this process's loop, which then looks at the log at its next
        poll (``engine_poll_seconds``).
        """
        if inline:
            self.catch_up()
            return
        behind = self.behind()
        if behind is None:
            self._follow_if_following()
            return
        head, at = behind
        self.wake()
        deadline = time.monotonic() + timeout
        pause = 0.002
        while True:
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            with read_connection(self.engine) as conn, conn.begin():
                at = self.applied(conn)
            if at >= head:
                self._follow_if_following()
                return
            if time.monotonic() >= deadline:
                raise EngineBehindError(head, at, timeout, self.failure.error if self.failure else None)

    # -- processing
    def run_once(self) -> int:
        """Process one batch; return how many events were read (0 when drained).

        Safe to call from several threads or processes at once: the batch runs under a
        database-wide lock (``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory
        lock on PostgreSQL) and re-reads the stored checkpoints of database-backed
        subscribers inside it, so no event is ever applied twice.
        """
        return self._run_once(hold=False)

    def _run_once(self, *, hold: bool) -> int:
        """:meth:`run_once`; ``hold``: the caller runs the next batch right away (see below)."""
        with self._lock:
            # The cycle collector is paused while a batch runs: a batch builds hundreds of thousands
            # of acyclic objects (decoded payloads, rows, sums), freed by reference counting when
            # _run_batch returns; the collector's passes over them found nothing and cost about a
            # third of the loop's CPU (measured). Cycles made meanwhile, by any thread, are
            # collected once it resumes.
            enabled = gc.isenabled() or self._gc_held > 0
            gc.disable()
            try:
                count = self._run_batch()
            finally:
                # A look-ahead's events and sums outlive the batch: a collection between two
                # batches would walk them all (1.2 s of CPU per 200,000 events, measured). A caller
                # that runs the next batch at once (catch_up, the background thread) keeps the
                # collector paused into it, for at most GC_HOLD batches in a row, and resumes it
                # when it stops (_release_gc).
                if hold and enabled and self._ahead is not None and self._gc_held < GC_HOLD:
                    self._gc_held += 1
                else:
                    self._gc_held = 0
                    if enabled:
                        gc.enable()
            if count:
                # After the batch's commit, not inside it: pickling the learners takes about a
                # second at 20,000 customers, and inside the batch's transaction it held SQLite's
                # write lock (every decision commit waited) and the batches' lock that long.
                self._snapshot_owed()
            return count

    def _release_gc(self) -> None:
        """Resume the collector if the last batch left it paused for the next one."""
        with self._lock:
            if self._gc_held:
                self._gc_held = 0
                gc.enable()

    def _run_batch(
        self, *, limit: int | None = None, until: int | None = None, only: frozenset[str] | None = None
    ) -> int:
        """:meth:`run_once` without the lock and the collector pause (the caller holds both).

        ``limit``: read at most this many events (not ``batch_size``); ``until``: none after this id;
        ``only``: apply them to these subscribers alone (the others' positions stay where they are;
        identity resolves them anyway). Each turns the look-ahead off for this batch (see
        :meth:`set_aside_failing`).

        On PostgreSQL a batch also stitches the *next* batch's identities (the look-ahead): the
        batch applies the subscribers to events resolved by the previous transaction, then reads
        (asked for when the batch began) and resolves the next events on a second connection
        while the server is still executing this batch's writes (sent in pipeline mode, without
        waiting for each; a read in a subscriber's ``apply`` would wait for all of them, and the
        look-ahead with it), writes their identities and folds their merges, and commits all of
        it with the checkpoints (identity's one batch ahead of the others'). The next batch applies those events if nothing changed in
        between (the stored checkpoints are the ones this batch wrote and no erasure was recorded);
        otherwise, as after a restart, it reads them again and only looks their customers up.
        """
        cached = self.positions()
        narrow = limit is not None or until is not None or only is not None
        if narrow:
            self._ahead = None
        if self._ahead is None and self.engine.dialect.name == "sqlite" and self._drained(cached):
            return 0
        ahead, self._ahead = self._ahead, None
        try:
            with self.engine.begin() as conn, _pipelined(conn) as postgres, ExitStack() as held:
                marked = None
                if postgres:
                    # Sent together: the checkpoints' read below waits once for all three.
                    send(conn, f"SELECT pg_advisory_xact_lock({int(BATCH_LOCK_ID)})")
                    marked = conn.connection.cursor()
                    marked.execute(_ERASURE_MARK)
                positions = self._stored_positions(conn, cached)
                low = min(positions.values())
                now = self.runtime.clock.now_ms()
                erased = _erasure_mark(marked) if marked is not None else 0
                reader: Connection | None = None
                pending: Any = None
                if ahead is not None and ahead.positions == positions and ahead.erased == erased:
                    batch, last, count, created = ahead.events, ahead.last, ahead.size, ahead.created
                    merges: list[tuple[int, int]] = []  # folded by the transaction that stitched them
                    stitched = False
                    if postgres and self.look_ahead:
                        # The next events, asked for now on a second connection (in pipeline mode, not
                        # waited for): the server reads them while the loop builds this batch's writes,
                        # and the look-ahead finds them there instead of waiting for them.
                        reader = held.enter_context(self.engine.connect())
                        held.enter_context(_pipelined(reader))
                        pending = _ask_events(
                            reader, after=last, limit=self.batch_size, before=append_horizon(reader)
                        )
                else:
                    # PostgreSQL: not past an id a transaction still in flight may commit (see ingest).
                    horizon = append_horizon(conn)
                    if until is not None:
                        horizon = until + 1 if horizon is None else min(horizon, until + 1)
                    rows = read_events(conn, after=low, limit=limit or self.batch_size, before=horizon)
                    if not rows:
                        self._positions = positions
                        return 0
                    batch, merges = self.identity.resolve(
                        conn, rows, apply_after=positions[IDENTITY], now_ms=now
                    )
                    last, count, created = rows[-1].id, len(rows), self.identity.created
                    stitched = True
                self._tell_created(conn, created)
                self._fold(conn, merges)
                new_positions = {IDENTITY: max(positions[IDENTITY], last)}
                for sub in self.subscribers:
                    seen = positions[sub.name]
                    if only is not None and sub.name not in only:
                        new_positions[sub.name] = seen
                        continue
                    unseen = batch if not batch or batch[0].id > seen else [e for e in batch if e.id > seen]
                    if unseen:
                        sub.apply(conn, unseen)
                    new_positions[sub.name] = max(seen, last)
                # Freeing a batch's events (their decoded payloads: about 13 ms of CPU per 10,000) after
                # its commit kept the server idle; here the server is busy with this batch's writes.
                self._spent = None
                if postgres and self.look_ahead and not narrow:
                    self._ahead = self._stitch_ahead(
                        conn,
                        new_positions,
                        last,
                        now,
                        erased,
                        fresh=not stitched,
                        reader=reader,
                        pending=pending,
                    )
                _store_positions(conn, new_positions, now)
        except BaseException:
            self._positions = None  # reload from the database: the transaction rolled back
            self._ahead = None
            raise
        self._positions = new_positions
        self._spent = batch if self._ahead is not None else None
        self.processed += count
        for listener in self.on_batch:
            listener(new_positions, count)
        return count

    def _drained(self, cached: dict[str, int]) -> bool:
        """SQLite: True (positions reloaded) when no subscriber has an event left to apply, read without the write lock.

        A batch begins by taking the database's write lock (``BEGIN IMMEDIATE``), and the loop
        looks at the log every poll and before every dispatcher round, mostly to find nothing
        new: each look held the lock that every decision commit of every worker waits for, for
        a few reads in a thread that waits for the interpreter lock between them (p50 0.9 ms,
        p99 5 ms, session 12's trace). This reads the same checkpoints and asks for one event
        after the lowest of them in a read-only transaction; when there is one, the batch reads
        it all again under the write lock, as before. An event committed after this read is
        picked up by the next look (as one committed after a batch's read always was).
        """
        with read_connection(self.engine) as conn, conn.begin():
            positions = self._stored_positions(conn, cached)
            low = min(positions.values())
            if conn.execute(select(events.c.id).where(events.c.id > low).limit(1)).first() is not None:
                return False
        self._positions = positions
        return True

    def _stored_positions(self, conn: Connection, cached: dict[str, int]) -> dict[str, int]:
        """Each subscriber's position: its stored checkpoint, or ``cached`` for one kept in memory."""
        stored = dict(conn.execute(select(checkpoints.c.name, checkpoints.c.position)).all())
        positions = {IDENTITY: int(stored.get(IDENTITY, 0))}
        for sub in self.subscribers:
            in_memory = getattr(sub, "in_memory", False)
            positions[sub.name] = cached[sub.name] if in_memory else int(stored.get(sub.name, 0))
        return positions

    def _tell_created(self, conn: Connection, created: frozenset[int]) -> None:
        for sub in self.subscribers:
            tell = getattr(sub, "created", None)
            if tell is not None:
                tell(conn, created)

    def _fold(self, conn: Connection, merges: list[tuple[int, int]]) -> None:
        if not merges:
            return
        for sub in self.subscribers:
            fold_all = getattr(sub, "merged_many", None)
            if fold_all is not None:
                fold_all(conn, merges)
            else:
                for winner, loser in merges:
                    sub.merged(conn, winner, loser)

    def _stitch_ahead(
        self,
        conn: Connection,
        positions: dict[str, int],
        after: int,
        now: int,
        erased: int,
        *,
        fresh: bool,
        reader: Connection | None = None,
        pending: Any = None,
    ) -> _Ahead | None:
        """Stitch the events after ``after`` in ``conn``'s transaction; advance ``positions`` (identity).

        ``fresh``: this transaction wrote no identity yet, so a second connection sees every
        identity it could, and reads there without waiting for ``conn``'s pipelined writes;
        ``reader`` is that connection when the caller holds one, ``pending`` the read of those
        events it already sent there (:func:`_ask_events`).
        """
        # (A batch that stitched its own events reads on ``conn``: no second connection checked out.)
        opened = self.engine.connect() if fresh and reader is None else nullcontext(reader or conn)
        with opened as reader:
            if pending is not None:
                rows = _decoded(pending)
            else:
                rows = read_events(reader, after=after, limit=self.batch_size, before=append_horizon(reader))
            if not rows:
                return None
            batch, merges = self.identity.resolve(
                conn, rows, apply_after=positions[IDENTITY], now_ms=now, reader=reader
            )
            created = self.identity.created
            for sub in self.subscribers:  # computed while the server executes this batch's writes
                prepare = getattr(sub, "prepare", None)
                if prepare is not None:
                    prepare(batch)
        # The merges of the next events, folded after this batch's events, before theirs (as a
        # batch of its own would); the next batch finds them folded.
        self._fold(conn, merges)
        positions[IDENTITY] = max(positions[IDENTITY], rows[-1].id)
        return _Ahead(dict(positions), erased, batch, rows[-1].id, len(rows), created)

    def catch_up(self) -> int:
        """Process batches until the log is drained; return how many events were read."""
        total = 0
        try:
            while n := self._run_once(hold=True):
                total += n
        finally:
            self._release_gc()
        return total

    @contextmanager
    def held(self) -> Iterator[None]:
        """No batch runs in this process meanwhile (the lock :meth:`run_once` holds).

        Take it *before* the database lock a batch takes inside: a caller that holds the batch
        lock (PostgreSQL's advisory lock, SQLite's write lock) and then waits for this one
        deadlocks with a batch that holds this one and waits for the batch lock.
        """
        with self._lock:
            yield

    def erase(self, conn: Connection, customer_ids: Sequence[int]) -> None:
        """Tell every subscriber that these customers are being erased (in ``conn``'s transaction).

        In a process that does not lead, the in-memory subscribers (the learners) first apply the log
        as far as the leader has: the caller holds the batches' lock, so that is where the leader's
        learners stand, and where every process's learners forget the customers (those of the other
        processes before their next batch: ``LearnerSubscriber.apply``).
        """
        with self._lock:
            self._follow_if_following()
            self._ahead = None  # its events and customers may be the erased ones
            for cid in customer_ids:
                for sub in self.subscribers:
                    sub.erased(conn, cid)
            for sub in self.subscribers:
                done = getattr(sub, "erasure_done", None)
                if done is not None:
                    done(conn)

    def snapshot_in_memory(self, *, owed_only: bool) -> int:
        """Snapshot the in-memory subscribers (the learners) that owe one (``owed_only``), or all;
        return how many were taken.

        No batch runs meanwhile; the learners are pickled outside any write transaction and
        written in a short one that takes the batches' lock, so an erasure committed by another
        process is seen by the snapshot. With ``owed_only`` nothing is opened unless one is owed:
        the idle loop asks every poll.
        """
        in_memory: list[Any] = [sub for sub in self.subscribers if getattr(sub, "in_memory", False)]
        owing = [
            sub
            for sub in in_memory
            if hasattr(sub, "snapshot_owed") and (not owed_only or sub.snapshot_owed())
        ]
        if not owing:
            return 0
        taken = 0
        with self._lock:
            for sub in owing:
                if not owed_only or sub.snapshot_owed():  # asked again: a batch may have taken it meanwhile
                    # Pickled outside the write transaction, written in a short one (see
                    # LearnerSubscriber.prepare_snapshot). Dated by the wall clock, not the
                    # learner's: a simulation's events carry simulated times, and `cadence models
                    # list` read them as the snapshot's date.
                    sub.write_snapshot(self.engine, sub.prepare_snapshot(self.engine), now_ms=wall_ms())
                    taken += 1
        return taken

    # -- background
    @property
    def running(self) -> bool:
        """True while the background thread runs."""
        return self._thread is not None

    def wake(self) -> None:
        """Ask the background thread to look at the log now (the leader's, when another process leads)."""
        self._wake.set()
        self._doorbell.ring()

    def start(self) -> None:
        """Run in a daemon thread until :meth:`stop` (only while holding leadership on PostgreSQL)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._doorbell = _Doorbell(str(self.engine.url), self._wake.set)  # (a stopped one stays shut)
        self._thread = threading.Thread(target=self._run, name="cadence-engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread after its current batch."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._release_leadership()

    def _is_leader(self) -> bool:
        """On PostgreSQL only one process runs the loop: the one holding the advisory lock."""
        return self.leadership.acquire()

    def _release_leadership(self) -> None:
        self._doorbell.shutdown()
        self.leadership.release()

    def _run(self) -> None:
        poll = self.runtime.settings.engine_poll_seconds
        while not self._stop.is_set():
            failing = self.failure
            if failing is not None and time.monotonic() < failing.next_attempt_s:
                # A failing batch fails again on every try (reading and decoding it each time): wake-ups
                # do not shorten the pause, which doubles up to MAX_RETRY_SECONDS.
                self._wake.wait(min(poll, max(0.0, failing.next_attempt_s - time.monotonic())))
                self._wake.clear()
                continue
            leads = False
            try:
                leads = self._is_leader()
                if leads:
                    self._doorbell.listen()
                    more = self._run_once(hold=True)
                    self._recovered()
                    if more:
                        continue  # more may be waiting
                    self.idle()
                else:
                    self._doorbell.close()
                    self.follow_in_memory()
            except Exception as exc:  # noqa: BLE001 - reported, retried; the loop must go on
                self._failed(exc, poll)
                self._positions = None
                failing = self.failure
                after = self.runtime.settings.engine_quarantine_after
                # Only the leading loop applies batches (a follower's failure is in following the log).
                if (
                    leads
                    and after
                    and failing is not None
                    and failing.attempts >= after
                    and is_data_error(exc)
                ):
                    try:
                        if self.set_aside_failing() is not None:
                            self._recovered()
                            continue
                    except Exception:  # noqa: BLE001 - the batch stays failing, retried as before
                        log.exception("engine loop could not set the failing event aside")
                        self._positions = None
            self._release_gc()
            self._wake.wait(poll)
            self._wake.clear()
        self._release_gc()

    def idle(self) -> None:
        """What the leading loop does on each poll that found nothing to read: let the subscribers
        meet an erasure another process made (``erasures_while_idle(engine)``, no batch running
        meanwhile), then take the snapshots owed (a burst's, or that erasure's)."""
        looking = [sub for sub in self.subscribers if hasattr(sub, "erasures_while_idle")]
        try:
            if looking:
                with self._lock:
                    for sub in looking:
                        sub.erasures_while_idle(self.engine)
        except Exception:  # noqa: BLE001 - not a failing batch: the next poll looks again
            log.exception(
                "engine loop: looking for erasures made elsewhere failed (the next poll looks again)"
            )
        self._snapshot_owed()

    def _snapshot_owed(self) -> None:
        """The snapshots the learners owe, after a batch or while the log is idle (a burst's, whose
        batches came too soon after the last one); a failure is logged, not a failing batch (the
        next batch or idle poll tries again)."""
        try:
            self.snapshot_in_memory(owed_only=True)
        except Exception:  # noqa: BLE001 - the loop must go on; the next batch or idle poll tries again
            log.exception(
                "engine loop: a learner snapshot it owed failed (tried again after the next batch or idle poll)"
            )

    def _failed(self, exc: Exception, poll: float) -> None:
        """Note a failed batch: the traceback the first time (or when the error changes), then one line
        a minute at most; the next try after a pause that doubles from ``poll`` up to MAX_RETRY_SECONDS."""
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        now = time.monotonic()
        failing = self.failure
        if failing is None or failing.error != error:
            try:
                after = min(self._positions.values()) if self._positions else self._lowest_position()
            except Exception:  # noqa: BLE001 - the database may be what fails
                after = -1
            self.failure = failing = LoopFailure(error, int(time.time() * 1000), 0, after, now, now)
            log.exception("engine loop batch after event %d failed; retrying with a growing pause", after)
        elif now - failing.logged_s >= 60:
            failing.logged_s = now
            log.error(
                "engine loop batch after event %d still failing (%d tries since %s): %s",
                failing.after_event,
                failing.attempts + 1,
                failing.report()["since"],
                error,
            )
        failing.attempts += 1
        failing.next_attempt_s = now + min(MAX_RETRY_SECONDS, poll * 2 ** min(failing.attempts, 16))

    def _follow_if_following(self) -> None:
        """In a serving process whose loop does not lead, bring its learners up to the leader's positions."""
        if self._thread is not None and not self.leadership.held:
            self.follow_in_memory()

    def follow_in_memory(self) -> int:
        """In a process whose loop does not lead: apply to its in-memory subscribers (the learners) the
        events the leading loop has applied, reading only; return how many events were read.

        Nothing is written: identities are only looked up (the events are at or before the
        leader's stored positions), and the learners take no snapshot (the leader's are the ones
        stored). A follower's learners then know the feedback the leader's know within a poll,
        instead of at the leader's next snapshot (every 10,000 events, 30 s apart at most).
        """
        memory = [s for s in self.subscribers if getattr(s, "in_memory", False)]
        if not memory:
            return 0
        total = 0
        with self._lock:
            while True:
                cached = self.positions()
                low = min(cached[s.name] for s in memory)
                with read_connection(self.engine) as conn, conn.begin():
                    if any(s.erasure_unmet(conn) for s in memory if hasattr(s, "erasure_unmet")):
                        # Another process's erasure: the newest snapshot and the log after it.
                        self._positions = None
                        continue
                    upto = self._stored_applied(conn)
                    if low >= upto:
                        return total
                    rows = read_events(conn, after=low, limit=self.batch_size, before=upto + 1)
                    if not rows:
                        return total
                    batch, _ = self.identity.resolve(
                        conn, rows, apply_after=upto, now_ms=self.runtime.clock.now_ms()
                    )
                    # What the leader set aside for a subscriber is not applied here either.
                    aside = {
                        (int(event_id), name)
                        for event_id, name in conn.execute(
                            select(engine_quarantine.c.event_id, engine_quarantine.c.subscriber).where(
                                engine_quarantine.c.event_id > low, engine_quarantine.c.event_id <= upto
                            )
                        )
                    }
                    for sub in memory:
                        seen = cached[sub.name]
                        unseen = [e for e in batch if e.id > seen and (e.id, sub.name) not in aside]
                        if unseen:
                            sub.following = True  # type: ignore[attr-defined]
                            try:
                                sub.apply(conn, unseen)  # the leader's merges too (the learners fold them)
                            finally:
                                sub.following = False  # type: ignore[attr-defined]
                        cached[sub.name] = max(seen, rows[-1].id)
                if self._positions is not None:
                    self._positions.update({s.name: cached[s.name] for s in memory})
                total += len(rows)

    def set_aside_failing(self) -> int | None:
        """Set aside the event a failing batch cannot get past; return its id (None if none failed alone).

        The batch's events are applied one at a time, each in its own transaction (those before
        the bad one are applied and kept). The event that fails alone is then applied to each
        subscriber on its own: those it fails in (all of them when identity fails) record it in
        ``engine_quarantine`` with the error and move past it; the others apply it. An error of
        the database or the machine (a lost connection, a locked or full disk) is not the
        event's: it is raised, and the batch stays failing.
        """
        with self._lock:
            for _ in range(self.batch_size):
                low = min(self.positions().values())
                try:
                    if not self._run_batch(limit=1):
                        return None
                except Exception as exc:
                    if not is_data_error(exc):
                        raise
                    break
            else:
                return None  # a whole batch's events applied one by one: the failure was not one event's
            with read_connection(self.engine) as conn:
                event_id = conn.scalar(select(func.min(events.c.id)).where(events.c.id > low))
            if event_id is None:
                return None
            event_id = int(event_id)
            failed: dict[str, str] = {}
            try:
                self._apply_alone(event_id, frozenset())  # identity (and merges) alone
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                failed = dict.fromkeys([IDENTITY, *(s.name for s in self.subscribers)], _one_line(exc))
            else:
                for sub in self.subscribers:
                    try:
                        self._apply_alone(event_id, frozenset({sub.name}))
                    except Exception as exc:
                        if not is_data_error(exc):
                            raise
                        failed[sub.name] = _one_line(exc)
            if failed:
                self._quarantine(event_id, failed)
            return event_id

    def _apply_alone(self, event_id: int, only: frozenset[str]) -> None:
        """Apply the log up to ``event_id`` to the subscribers in ``only`` (identity alone when empty):
        the events before it first (a learner that reloaded its snapshot after the failed batch
        replays them), then the event in a transaction of its own."""
        name = next(iter(only), IDENTITY)
        while self.positions()[name] < event_id - 1:
            if not self._run_batch(until=event_id - 1, only=only):
                break
        self._run_batch(until=event_id, only=only)

    def _quarantine(self, event_id: int, failed: dict[str, str]) -> None:
        """Record ``event_id`` as set aside for the subscribers in ``failed`` (name -> error) and move
        their positions past it."""
        now = self.runtime.clock.now_ms()
        with self.engine.begin() as conn:
            lock_batches(conn)
            positions = self._stored_positions(conn, self.positions())
            moved = {
                name: error for name, error in failed.items() if positions.get(name, event_id) < event_id
            }
            if not moved:
                return
            conn.execute(
                engine_quarantine.insert(),
                [
                    {"event_id": event_id, "subscriber": name, "error": error, "quarantined_ms": now}
                    for name, error in moved.items()
                ],
            )
            for name in moved:
                positions[name] = event_id
            _store_positions(conn, positions, now)
        self._positions = positions
        log.error(
            "engine loop set event %d aside for %s: %s (see `cadence engine status`; "
            "`cadence engine retry %d` applies it again once the cause is fixed)",
            event_id,
            ", ".join(sorted(moved)),
            next(iter(moved.values())),
            event_id,
        )

    def quarantined(self, conn: Connection, *, limit: int = 20) -> dict[str, Any]:
        """How many events are set aside, and the newest ``limit`` (event, subscriber, error, when)."""
        count = int(conn.scalar(select(func.count()).select_from(engine_quarantine)) or 0)
        rows = conn.execute(
            select(
                engine_quarantine.c.event_id,
                engine_quarantine.c.subscriber,
                engine_quarantine.c.error,
                engine_quarantine.c.quarantined_ms,
            )
            .order_by(engine_quarantine.c.id.desc())
            .limit(limit)
        ).all()
        return {
            "count": count,
            "recent": [
                {
                    "event_id": int(r.event_id),
                    "subscriber": r.subscriber,
                    "error": r.error,
                    "at": datetime.fromtimestamp(r.quarantined_ms / 1000, tz=UTC).isoformat(
                        timespec="seconds"
                    ),
                }
                for r in rows
            ],
        }

    def retry(self, event_id: int) -> list[str]:
        """Apply a set-aside event again to the database-backed subscribers it was set aside for;
        return their names (its quarantine rows go). Raises what the subscriber raises (the rows stay).

        The event is applied late, after events that came after it: attribution credits it where it
        belongs; profile counters and consent take it as any event imported late.
        """
        with self._lock, self.engine.begin() as conn:
            lock_batches(conn)
            names = {
                r[0]
                for r in conn.execute(
                    select(engine_quarantine.c.subscriber).where(engine_quarantine.c.event_id == event_id)
                )
            }
            if not names:
                raise CadenceError(f"event {event_id} is not set aside (see `cadence engine status`)")
            by_name = {s.name: s for s in self.subscribers}
            memory = sorted(n for n in names if n in by_name and getattr(by_name[n], "in_memory", False))
            if memory:
                raise CadenceError(
                    f"event {event_id} is set aside for {', '.join(memory)}, whose state lives in the "
                    "serving process: it cannot be applied again from here"
                )
            positions = self._stored_positions(conn, self.positions())
            rows = read_events(conn, after=event_id - 1, limit=1)
            if not rows or rows[0].id != event_id:
                raise CadenceError(f"event {event_id} is no longer in the log (erased?)")
            now = self.runtime.clock.now_ms()
            if IDENTITY in names:
                batch, merges = self.identity.resolve(conn, rows, apply_after=event_id - 1, now_ms=now)
                self._tell_created(conn, self.identity.created)
                self._fold(conn, merges)
            else:
                batch, _ = self.identity.resolve(conn, rows, apply_after=positions[IDENTITY], now_ms=now)
            applied = sorted(n for n in names if n in by_name)
            for name in applied:
                by_name[name].apply(conn, batch)
            conn.execute(engine_quarantine.delete().where(engine_quarantine.c.event_id == event_id))
        self._positions = None
        return sorted(names)

    def _recovered(self) -> None:
        if self.failure is not None:
            log.warning(
                "engine loop batches commit again after %d failed tries (%s)",
                self.failure.attempts,
                self.failure.error,
            )
            self.failure = None

    def _lowest_position(self) -> int:
        with read_connection(self.engine) as conn:
            return int(conn.scalar(select(func.min(checkpoints.c.position))) or 0)


def _events_after(conn: Connection, position: int) -> int:
    """How many events the log holds after ``position``."""
    return int(conn.scalar(select(func.count()).select_from(events).where(events.c.id > position)) or 0)


class _Ahead(NamedTuple):
    """The next batch, stitched by the transaction that committed ``positions``."""

    positions: dict[str, int]  # the checkpoints that transaction stored
    erased: int  # the last erasure recorded when it ran
    events: list[LoggedEvent]
    last: int  # the last event id read (events without a customer are not in ``events``)
    size: int  # how many events were read
    created: frozenset[int]


@contextmanager
def _pipelined(conn: Connection) -> Iterator[bool]:
    """On PostgreSQL, run the block in psycopg's pipeline mode; yield whether it is PostgreSQL.

    Statements whose results nobody reads are sent without waiting for them: the server
    executes the batch's writes while the loop goes on computing. A read waits for every
    statement sent before it; an error surfaces at the next read or at the block's end, and
    fails the batch (its transaction rolls back). The block ends before the commit.
    """
    if conn.dialect.name != "postgresql":
        yield False
        return
    with conn.connection.driver_connection.pipeline() as pipeline:  # type: ignore[union-attr]
        # SQLAlchemy's own statements wait for their results (it reads a result's columns as
        # soon as the statement returns); only :func:`cadence.store.fast.send`'s do not.
        def wait(*_args: Any) -> None:
            pipeline.sync()

        event.listen(conn, "after_cursor_execute", wait)
        try:
            yield True
        finally:
            event.remove(conn, "after_cursor_execute", wait)


_ERASURE_MARK = "SELECT coalesce(max(id), 0) FROM erasures"


def _erasure_mark(asked: Any) -> int:
    """The id of the last recorded erasure (0 if none), from a cursor that ran :data:`_ERASURE_MARK`.

    A look-ahead made before a later erasure is stale.
    """
    try:
        row = asked.fetchone()
    finally:
        asked.close()
    return int(row[0] or 0) if row else 0


class _Row(NamedTuple):
    id: int
    message_id: str
    type: str
    event: str | None
    user_id: str | None
    anonymous_id: str | None
    ts_ms: int
    source: str
    payload: dict[str, Any]


def read_events(conn: Connection, *, after: int, limit: int, before: int | None = None) -> list[_Row]:
    """Up to ``limit`` events with ids after ``after`` (and below ``before``), in order, payloads decoded."""
    if conn.dialect.name == "postgresql":
        return _decoded(_ask_events(conn, after=after, limit=limit, before=before))
    return _decoded(fetch_rows(conn, _events_query(after, limit, before, postgres=False)))


def _events_query(after: int, limit: int, before: int | None, *, postgres: bool) -> str:
    # On PostgreSQL the payload comes as text for orjson: psycopg's jsonb loader is the stdlib's.
    payload = "payload::text" if postgres else "payload"
    return (
        f"SELECT id, message_id, type, event, user_id, anonymous_id, ts_ms, source, {payload} FROM events"
        f" WHERE id > {int(after)}{'' if before is None else f' AND id < {int(before)}'}"
        f" ORDER BY id LIMIT {int(limit)}"
    )


def _ask_events(conn: Connection, *, after: int, limit: int, before: int | None) -> Any:
    """PostgreSQL: send :func:`read_events`'s query; return its cursor (``fetchall`` waits for the rows).

    In pipeline mode nothing waits here: the server reads while the caller goes on.
    """
    # Only the primary key's order, walked from ``after``: when the table's statistics are older
    # than a large import (autovacuum has not analysed it yet), the planner expects a few rows
    # and reads every event after ``after`` in a bitmap scan, then sorts them for the first
    # ``limit``: a catch-up read the log's tail once per batch (200,000 events: 3 s of the
    # server's CPU against 0.3 s, measured).
    send(conn, "SET LOCAL enable_sort = off")
    cursor = conn.connection.cursor()
    cursor.execute(_events_query(after, limit, before, postgres=True))
    # The rest of the transaction plans as usual (after an error it is rolled back, setting and all).
    send(conn, "SET LOCAL enable_sort TO DEFAULT")
    return cursor


def _decoded(source: Any) -> list[_Row]:
    """The rows of :func:`read_events` (a cursor, or rows fetched), payloads decoded."""
    rows = rows_of(source)
    loads, new = orjson.loads, tuple.__new__
    return [
        new(_Row, (*r[:8], r[8] if isinstance(r[8], dict) else loads(r[8])))  # type: ignore[type-var]
        for r in rows
    ]


def is_data_error(exc: BaseException) -> bool:
    """True when ``exc`` says an event cannot be applied, not that the database or the machine failed
    (those are retried, never a reason to set an event aside)."""
    import sqlalchemy.exc as sa_exc

    infrastructure = (
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.TimeoutError,
        sa_exc.DisconnectionError,
        OSError,
        MemoryError,
    )
    if isinstance(exc, infrastructure):
        return False
    return not (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]


def _store_positions(conn: Connection, positions: dict[str, int], now_ms: int) -> None:
    # Nothing read back: on PostgreSQL it goes with the batch's pipelined writes, without a wait.
    write_rows(
        conn,
        "checkpoints",
        (("name", "text"), ("position", "bigint"), ("updated_ms", "bigint")),
        [(name, pos, now_ms) for name, pos in sorted(positions.items())],
        "ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_ms = excluded.updated_ms",
    )
