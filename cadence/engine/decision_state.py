"""What a decision reads about a customer, cached per process and checked against the database each time.

A decision needs the customer behind an id, their profile (traits, zone, event
aggregates, consent) and their recent sends. Loading the profile takes six queries; the
cache keeps it per customer reference and, on every decision, checks it with **one**
statement that also reads the sends, so a cached decision costs one round trip:

* the **profile** is kept with a *stamp* read before it was loaded: the profile row's
  ``event_count`` and ``updated_event_id`` (the engine loop changes both with every
  event it applies for the customer: traits, aggregates and consent all come from
  events, consent set through the API included) and the customer's ``merged_into``
  (set when the customer is merged into another). The stamp is read again with the
  sends; any difference, a missing customer (erased) or a missing row that now exists
  reloads the profile. Because the stamp is read *before* the profile it guards, a
  profile loaded while the loop commits is reloaded on the next decision, never kept;
* the **sends** are never cached: every decision reads them, so a send queued a moment
  ago, by this process or another worker, is counted by the next decision;
* an entry older than ``ttl_seconds`` is reloaded whatever its stamp: the bound for
  changes no stamp shows (an anonymous id that later became another customer's user
  id, where user ids win).

The check runs on a connection of the caller's transaction (commit mode) or, for
previews, on a connection of the cache's own, detached from the pool and reading in
autocommit (SQLite in WAL mode and PostgreSQL never block such reads).

**PostgreSQL previews without the check** (``listen=True``, as the API's cache is). On SQLite
the check is an in-process read; on PostgreSQL it is a round trip per preview, and on a
small machine the backend it wakes competes with the workers. So there a cache that listens
keeps a thread with one connection that listens (``LISTEN``) on :data:`CHANNEL`, where, once a
transaction commits, the triggers of migration notify13_0004 notify the customer ids whose
counting sends (inserted, deleted, entering or leaving ``queued``/``sending``/``sent``, due
time, campaign or channel changed), ``merged_into`` (merges) or row (erasure) it changed,
whoever wrote them, and the profiles' writers (the engine loop: :func:`cadence.engine.profiles.notify_inputs`)
those whose profile they wrote (``*`` for more than 2,000 customers at once: everyone). The rows a check of a
customer read (single, batched, or loading) are kept as the customer's *clean* inputs if
nothing was notified for the customer between the moment before the check was read and
now, and the listener was connected all along; a notification for the customer (or a
commit of this process that queued it a send) forgets them. A preview whose entry is
within ``ttl_seconds``, whose customer is clean and whose stamp matches is answered from
them without a round trip. Listener lost: everything clean is forgotten and every preview
checks, as before, until it is back (reconnecting every second); only what is checked after
it reconnected is clean again. Commits are unchanged: they check inside their transaction.

The semantic change: **on PostgreSQL a preview sees another process's (or connection's)
change once its notification has arrived**, not strictly at the next decision. The delay
is the notification's delivery (measured on loopback, load average 2: p50 0.11 ms, p99 0.22 ms
after the writer's commit returned; more when the machine is busy: the listener is a thread
that needs the GIL and the CPU. docs/measurements.md, session 13). A preview after a
commit of this process's sees that commit (it forgets the customer synchronously);
:meth:`DecisionState.sync` waits until every change committed before it was heard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import orjson
from sqlalchemy import Connection, Engine

from cadence.engine.campaign import DAY_MS, CompiledRuleset
from cadence.engine.consent import undeliverable
from cadence.engine.decision import PastSend
from cadence.engine.profiles import StoredProfile

__all__ = [
    "CHANNEL",
    "CHECK_GROUP_PG",
    "CHECK_MANY_PG",
    "CHECK_SESSION_PG",
    "HISTORY_MS",
    "DecisionInputs",
    "DecisionState",
    "check_sql",
    "committed_sends",
    "history_from_rows",
]

log = logging.getLogger("cadence.engine.decision_state")

#: The channel the triggers of migration notify13_0004 notify on: customer ids, comma-separated
#: (several notifications for many), or ``*`` (too many to name: every customer may have changed).
CHANNEL = "cadence_inputs"

#: The triggers a listener needs before it trusts anything (migration notify13_0004).
TRIGGERS = (
    "cadence_inputs_sends_ins",
    "cadence_inputs_sends_upd",
    "cadence_inputs_sends_del",
    "cadence_inputs_customers_upd",
    "cadence_inputs_customers_del",
)

#: How far back sends count as history (the longest cap window the language allows is 30 days).
HISTORY_MS = 35 * DAY_MS

# One statement: the customer's sends still counting (kind 0) and the profile's stamp (kind 1).
_CHECK = (
    "SELECT 0, due_ms, campaign, channel FROM sends "
    "WHERE customer_id = ? AND status IN ('queued', 'sending', 'sent') AND due_ms > ? "
    "UNION ALL "
    "SELECT 1, p.event_count, CAST(p.updated_event_id AS VARCHAR(24)), CAST(c.merged_into AS VARCHAR(24)) "
    "FROM customers c LEFT JOIN profiles p ON p.customer_id = c.id WHERE c.id = ?"
)

#: The check for many customers in one statement (PostgreSQL, libpq's ``$n`` placeholders: the
#: customer ids as an array, the oldest send time that counts); each row leads with its customer id.
CHECK_MANY_PG = (
    "SELECT customer_id, 0, due_ms, campaign, channel FROM sends "
    "WHERE customer_id = ANY($1::bigint[]) AND status IN ('queued', 'sending', 'sent') AND due_ms > $2::bigint "
    "UNION ALL "
    "SELECT c.id, 1, p.event_count, CAST(p.updated_event_id AS VARCHAR(24)), CAST(c.merged_into AS VARCHAR(24)) "
    "FROM customers c LEFT JOIN profiles p ON p.customer_id = c.id WHERE c.id = ANY($1::bigint[])"
)

#: :data:`CHECK_MANY_PG` written so that any plan of it looks each customer up by index (the commit
#: groups' writers, whose sessions run other statements too): one customer at a time (lateral subqueries
#: the planner cannot flatten into joins, ``OFFSET 0``), the sends by the customer index only (the status
#: and time conditions are not indexable as written). Left to the planner, the generic plan of
#: :data:`CHECK_MANY_PG` read the sends by the status index (every queued send of every customer,
#: filtered by customer: 1,030 buffers and 1.4-1.9 ms for a group of four at 2,000 queued sends, 0.37 ms
#: of the server's CPU per commit, measured with ``auto_explain`` and ``pg_stat_statements``) and the
#: profiles by a sequential scan; the first rewrite, ``customer_id = ANY(...)`` alone indexable, was read
#: by a sequential scan of the sends (2.7 ms), and the customers too.
CHECK_GROUP_PG = (
    "SELECT i.id, 0, s.due_ms, s.campaign, s.channel FROM unnest($1::bigint[]) AS i(id) CROSS JOIN LATERAL "
    "(SELECT due_ms, campaign, channel FROM sends WHERE customer_id = i.id "
    "AND status || '' IN ('queued', 'sending', 'sent') AND due_ms + 0 > $2::bigint OFFSET 0) s "
    "UNION ALL "
    "SELECT c.id, 1, p.event_count, CAST(p.updated_event_id AS VARCHAR(24)), CAST(c.merged_into AS VARCHAR(24)) "
    "FROM unnest($1::bigint[]) AS j(id) CROSS JOIN LATERAL "
    "(SELECT id, merged_into FROM customers WHERE id = j.id OFFSET 0) c LEFT JOIN LATERAL "
    "(SELECT event_count, updated_event_id FROM profiles WHERE customer_id = c.id OFFSET 0) p ON true"
)

#: Session settings for a PostgreSQL connection of cadence's own that runs :data:`CHECK_MANY_PG`
#: (the preview batcher's, which runs nothing else): one generic plan of index look-ups per
#: customer, whatever the array holds. Left to itself the planner re-planned each statement (a
#: custom plan: about 0.3 ms of the server's CPU, more than the check) or, generic, guessed ten
#: customers and read every profile and every counting send of a small table. Measured per
#: statement of one customer: 0.16 ms of the server's CPU against 0.46-0.49 ms (custom plans) and
#: 0.18-0.34 ms for the single check; of four: 0.31-0.33 ms against 0.8-0.9 ms. The commit
#: pipeline's connection takes them too (:data:`CHECK_GROUP_PG`; session 15: in the benchmark its
#: connections had reached the generic plan by themselves, but a fresh one on the benchmark's data
#: planned the check anew at each execution, 0.29-0.35 ms against 0.07-0.17 ms).
CHECK_SESSION_PG = ("plan_cache_mode = force_generic_plan", "enable_seqscan = off", "enable_bitmapscan = off")

Stamp = tuple[Any, Any, Any]  # (event_count, updated_event_id, merged_into); None when erased

_ERASED: Stamp = ("erased", None, None)


def check_sql(postgres: bool) -> str:
    """The check statement with the driver's placeholders.

    >>> check_sql(True).count("%s"), check_sql(False).count("?")
    (3, 3)
    """
    return _CHECK.replace("?", "%s") if postgres else _CHECK


def history_from_rows(rows: Sequence[Sequence[Any]], ruleset: CompiledRuleset) -> list[PastSend]:
    """The sends of the check's kind-0 rows as :class:`PastSend` (with the campaign's exclusive group),
    oldest first: the statements have no ``ORDER BY`` (the rows come in whatever order the plan
    reads them), and an explanation names the first send in the history that blocks a time.

    >>> from cadence.engine.campaign import GlobalSettings
    >>> rules = CompiledRuleset(hash="h", campaigns={}, segments={}, settings=GlobalSettings(),
    ...                         aggregates=frozenset())
    >>> history_from_rows([(0, 5, "gone", "email"), (1, 3, "7", None)], rules)
    [PastSend(ts_ms=5, campaign='gone', channel='email', exclusive=None)]
    >>> [h.ts_ms for h in history_from_rows([(0, 9, "b", "sms"), (1, 3, "7", None), (0, 5, "a", "email")], rules)]
    [5, 9]
    """
    campaigns = ruleset.campaigns
    out = []
    for kind, due_ms, campaign, channel in rows:
        if kind == 0:
            known = campaigns.get(campaign)
            out.append(
                PastSend(
                    ts_ms=due_ms,
                    campaign=campaign,
                    channel=channel,
                    exclusive=known.exclusive if known else None,
                )
            )
    out.sort(key=attrgetter("ts_ms", "campaign", "channel"))
    return out


def _stamp_of(rows: Sequence[Sequence[Any]]) -> Stamp:
    for kind, count, updated, merged in rows:
        if kind == 1:
            return (count, updated, merged)
    return _ERASED


@dataclass(frozen=True)
class DecisionInputs:
    """What :func:`~cadence.engine.decide.decide` needs about one customer, and whether it came cached."""

    customer_id: int
    profile: StoredProfile
    history: list[PastSend]
    cached: bool


@dataclass
class _Entry:
    customer_id: int
    profile: StoredProfile
    stamp: Stamp
    loaded: float


class DecisionState:
    """Per-process cache of customers' profiles for decisions, checked on every use (see the module).

    Thread-safe: entries are replaced whole under a lock; profiles are never mutated.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_entries: int = 100_000,
        ttl_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        listen: bool = False,
    ) -> None:
        self.engine = engine
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.postgres = engine.dialect.name == "postgresql"
        self.sql = check_sql(self.postgres)
        self.hits = 0
        self.misses = 0
        #: Commits decided before their transaction: recorded as decided, or decided again in it.
        self.revalidated = 0
        self.redecided = 0
        #: Commits recorded by a group's shared statements (``record_decisions`` on PostgreSQL).
        self.grouped = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest load first
        self._lock = threading.Lock()
        self._local = threading.local()
        self._raw: list[Any] = []
        # An app dropped without a shutdown (tests, scripts) still closes the connections it opened.
        self._finalizer = weakref.finalize(self, _close_all, self._raw)
        # -- previews without a check (PostgreSQL, LISTEN: see the module)
        self.listen = listen and self.postgres
        #: Previews answered from a clean entry without a check; notification messages received.
        self.listened = 0
        self.notified = 0
        #: Set while the listener is connected; ``lost`` once it lost its connection (tests wait on them).
        self.listening = threading.Event()
        self.lost = threading.Event()
        #: The listener's server process (None until connected).
        self.listener_pid: int | None = None
        self._listening = False
        self._epoch = 0  # bumped on every (re)connection of the listener
        self._seq = 0  # bumped on every invalidation (a notification, a commit of this process)
        self._recent: deque[tuple[int, frozenset[int] | None]] = deque(maxlen=4096)
        # customer id -> (listener epoch, check rows, oldest send time they hold): clean since checked
        self._clean: OrderedDict[int, tuple[int, list[Any], int]] = OrderedDict()
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self._syncs: dict[str, threading.Event] = {}
        _STATES.add(self)

    # -- connections
    def _own_connection(self) -> Any:
        """This thread's DBAPI connection for preview reads (autocommit, detached from the pool).

        Held in the thread's local storage: when the thread ends (a server's idle worker thread
        is stopped after a while and a new one started when needed), the storage goes and the
        connection is closed with it, so threads that come and go do not pile connections up.
        """
        held: _ThreadConnection | None = getattr(self._local, "held", None)
        if held is None:
            proxied = self.engine.raw_connection()
            raw = proxied.driver_connection
            assert raw is not None
            proxied.detach()  # ours until close(): the pool neither resets nor hands it out
            if self.postgres:
                raw.autocommit = True
            with self._lock:
                self._raw.append(raw)
            held = self._local.held = _ThreadConnection(raw, self._raw, self._lock)
        return held.raw

    def _drop_own_connection(self) -> None:
        held: _ThreadConnection | None = getattr(self._local, "held", None)
        self._local.held = None
        if held is not None:
            held.release()  # it is broken already; we only let it go

    def close(self) -> None:
        """Close the cache's own connections (the listener's too) and forget every entry."""
        self.stop_listening()
        with self._lock:
            self._entries.clear()
            _close_all(self._raw)

    def stop_listening(self) -> None:
        """Stop the listener for good: from now on every preview checks its customer."""
        self.listen = False
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None and listener is not threading.current_thread():
            listener.join(timeout=5.0)
        with self._lock:
            self._listening = False
            self._clean.clear()

    # -- the listener (PostgreSQL): which customers changed, told by the triggers of notify13_0004
    def start_listening(self) -> None:
        """Start the listener thread if this cache listens and it is not running (in this process)."""
        if not self.listen or self._stop.is_set():
            return
        with self._lock:
            if self._listener is not None and self._listener.is_alive():
                return
            self._listener = threading.Thread(
                target=_listen_forever,
                args=(weakref.ref(self), self._stop),
                name="cadence-decision-listener",
                daemon=True,
            )
            self._listener.start()

    def _connect_listener(self) -> Any:
        """A connection of our own that LISTENs, or None when the triggers it relies on are missing."""
        proxied = self.engine.raw_connection()
        conn = proxied.driver_connection
        proxied.detach()  # ours until closed
        try:
            conn.autocommit = True
            conn.execute(f"LISTEN {CHANNEL}")
            found = conn.execute(
                "SELECT count(*) FROM pg_trigger WHERE tgname = ANY(%s) AND NOT tgisinternal",
                [list(TRIGGERS)],
            ).fetchone()[0]
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        if found < len(TRIGGERS):
            conn.close()
            return None
        # Listening from here: whatever commits from now on is notified. Only what is checked (or
        # loaded) from now on is trusted.
        self.listener_pid = conn.info.backend_pid
        with self._lock:
            self._epoch += 1
            self._clean.clear()
            self._listening = True
        self.lost.clear()
        self.listening.set()
        return conn

    def _listener_lost(self, conn: Any) -> None:
        with self._lock:
            self._listening = False
            self._clean.clear()
        self.listening.clear()
        self.lost.set()
        if conn is not None:
            with contextlib.suppress(Exception):  # broken already, most likely
                conn.close()

    def sync(self, timeout: float = 10.0) -> bool:
        """Wait until the listener heard every change committed before this call; False if not listening.

        Sends a notification of its own on the channel and waits for it: notifications arrive in
        commit order, so once it is here, so are those of every transaction committed before.
        """
        if not self._listening:
            return False
        token = f"sync:{id(self)}:{time.monotonic_ns()}"
        heard = self._syncs[token] = threading.Event()
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT pg_notify(%s, %s)", (CHANNEL, token))
                conn.commit()
            return heard.wait(timeout)
        finally:
            self._syncs.pop(token, None)

    def _notified(self, payload: str) -> None:
        if payload.startswith("sync:"):
            heard = self._syncs.get(payload)
            if heard is not None:
                heard.set()
            return
        self.notified += 1
        if payload == "*":
            self._invalidate(None)
        else:
            self._invalidate(frozenset(int(i) for i in payload.split(",") if i))

    def _invalidate(self, ids: frozenset[int] | None) -> None:
        with self._lock:
            self._seq += 1
            self._recent.append((self._seq, ids))
            if ids is None:
                self._clean.clear()
            else:
                for customer_id in ids:
                    self._clean.pop(customer_id, None)

    def invalidate(self, customer_ids: Sequence[int]) -> None:
        """Forget that these customers' inputs are clean (a commit of this process changed them)."""
        if self.listen:
            self._invalidate(frozenset(customer_ids))

    def mark(self) -> tuple[int, int] | None:
        """Where the listener is, taken before a check is read (None: not listening, trust nothing)."""
        if not self._listening:
            return None
        with self._lock:
            return (self._epoch, self._seq) if self._listening else None

    def _trust(self, customer_id: int, rows: list[Any], since: int, mark: tuple[int, int] | None) -> None:
        """Remember ``rows`` (read after ``mark``) as the customer's clean inputs, unless changed since."""
        if mark is None:
            return
        with self._lock:
            if not self._listening or self._epoch != mark[0]:
                return
            if self._seq != mark[1]:
                recent = self._recent
                if not recent or recent[0][0] > mark[1] + 1:
                    return  # invalidations we no longer know of since the mark
                for seq, ids in reversed(recent):
                    if seq <= mark[1]:
                        break
                    if ids is None or customer_id in ids:
                        return
            self._clean[customer_id] = (mark[0], rows, since)
            self._clean.move_to_end(customer_id)
            while len(self._clean) > self.max_entries:
                self._clean.popitem(last=False)

    def trust_batch(
        self, rows_by_customer: dict[int, list[Any]], since: int, mark: tuple[int, int] | None
    ) -> None:
        """Remember a batched check's rows (read after ``mark``, sends after ``since``) as clean."""
        if mark is None:
            return
        for customer_id, rows in rows_by_customer.items():
            self._trust(customer_id, rows, since, mark)

    def listened_inputs(
        self, customer_ref: str, *, now_ms: int, ruleset: CompiledRuleset
    ) -> DecisionInputs | None:
        """The cached inputs of ``customer_ref`` without a check, when clean (see the module), else None."""
        if not self._listening:
            if self.listen and self._listener is None:
                self.start_listening()
            return None
        entry = self._entries.get(customer_ref)
        if entry is None or entry.stamp is _ERASED or self.clock() - entry.loaded >= self.ttl_seconds:
            return None
        clean = self._clean.get(entry.customer_id)
        if clean is None:
            return None
        epoch, rows, since = clean
        floor = now_ms - HISTORY_MS
        if epoch != self._epoch or floor < since or _stamp_of(rows) != entry.stamp:
            return None
        if floor > since:
            rows = [row for row in rows if row[0] == 1 or row[1] > floor]
        self.hits += 1
        self.listened += 1
        return DecisionInputs(entry.customer_id, entry.profile, history_from_rows(rows, ruleset), True)

    def _check(self, raw: Any, customer_id: int, now_ms: int) -> list[Any]:
        cur = raw.cursor()
        try:
            cur.execute(self.sql, (customer_id, now_ms - HISTORY_MS, customer_id))
            return list(cur.fetchall())
        finally:
            cur.close()

    # -- entries
    def forget(self, customer_ref: str | None = None) -> None:
        """Drop one customer reference's entry, or every entry."""
        with self._lock:
            if customer_ref is None:
                self._entries.clear()
            else:
                self._entries.pop(customer_ref, None)

    def customer_of(self, customer_ref: str) -> int | None:
        """The customer id cached for ``customer_ref`` (None if not cached); may be stale until checked."""
        entry = self._entries.get(customer_ref)
        return entry.customer_id if entry is not None else None

    def fresh_customer_of(self, customer_ref: str) -> int | None:
        """The customer id of a cached entry younger than the TTL (what a batched check needs), else None."""
        entry = self._entries.get(customer_ref)
        if entry is None or entry.stamp is _ERASED or self.clock() - entry.loaded >= self.ttl_seconds:
            return None
        return entry.customer_id

    def inputs_from(
        self,
        customer_ref: str,
        rows_by_customer: dict[int, list[Any]],
        *,
        now_ms: int,
        ruleset: CompiledRuleset,
    ) -> DecisionInputs | None:
        """The cached inputs of ``customer_ref`` checked against rows a batched check read, else None.

        ``rows_by_customer`` holds each customer's check rows (``(kind, a, b, c)``, as the single
        check's) read by :data:`CHECK_MANY_PG` with an oldest send time at or before this
        request's own (``now_ms - HISTORY_MS``): sends older than that are dropped here, so the
        history is the one the single check would read. None when the entry is gone, too old,
        or its stamp differs (the caller then reads through :meth:`inputs`, which reloads).
        """
        entry = self._entries.get(customer_ref)
        if entry is None or entry.stamp is _ERASED or self.clock() - entry.loaded >= self.ttl_seconds:
            return None
        rows = rows_by_customer.get(entry.customer_id)
        if rows is None:
            return None
        since = now_ms - HISTORY_MS
        mine = [row for row in rows if row[0] == 1 or row[1] > since]
        if _stamp_of(mine) != entry.stamp:
            return None
        self.hits += 1
        return DecisionInputs(entry.customer_id, entry.profile, history_from_rows(mine, ruleset), True)

    def __len__(self) -> int:
        return len(self._entries)

    def _store(self, ref: str, entry: _Entry) -> None:
        with self._lock:
            self._entries[ref] = entry
            self._entries.move_to_end(ref)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def inputs(
        self,
        customer_ref: str,
        *,
        now_ms: int,
        ruleset: CompiledRuleset,
        conn: Connection | None = None,
        transaction: Any = None,
    ) -> DecisionInputs | None:
        """The customer behind ``customer_ref`` with profile and sends, or None for an unknown id.

        With ``conn`` (a transaction that will write, as a commit does), or ``transaction``
        (the DBAPI connection of one), everything is read on it; without, on the cache's own
        connection, retried once on a fresh connection if that one broke.
        """
        if conn is not None:
            transaction = conn.connection.dbapi_connection
        if transaction is not None:
            return self._inputs(transaction, customer_ref, now_ms, ruleset, True)
        try:
            return self._inputs(self._own_connection(), customer_ref, now_ms, ruleset, False)
        except Exception as exc:
            if not _is_disconnect(exc):
                raise
            self._drop_own_connection()
            return self._inputs(self._own_connection(), customer_ref, now_ms, ruleset, False)

    def _inputs(
        self, raw: Any, ref: str, now_ms: int, ruleset: CompiledRuleset, in_transaction: bool
    ) -> DecisionInputs | None:
        mark = None
        if self.listen and not in_transaction:  # a preview: clean inputs need no check
            found = self.listened_inputs(ref, now_ms=now_ms, ruleset=ruleset)
            if found is not None:
                return found
            mark = self.mark()
        entry = self._entries.get(ref)
        if entry is not None and self.clock() - entry.loaded < self.ttl_seconds:
            rows = self._check(raw, entry.customer_id, now_ms)
            if _stamp_of(rows) == entry.stamp and entry.stamp is not _ERASED:
                self.hits += 1
                self._trust(entry.customer_id, rows, now_ms - HISTORY_MS, mark)
                return DecisionInputs(
                    entry.customer_id, entry.profile, history_from_rows(rows, ruleset), True
                )
        self.misses += 1
        if in_transaction:  # the caller's transaction: one snapshot (SQLite) or serialised (commit)
            return self._load(raw, ref, now_ms, ruleset)
        if self.postgres:
            return self._load(raw, ref, now_ms, ruleset, mark)
        raw.execute("BEGIN")  # one snapshot for everything read (a deferred read: no write lock)
        try:
            return self._load(raw, ref, now_ms, ruleset)
        finally:
            raw.execute("COMMIT")

    def _query(self, raw: Any, sql: str, *params: Any) -> list[Any]:
        cur = raw.cursor()
        try:
            cur.execute(sql.replace("?", "%s") if self.postgres else sql, params)
            return list(cur.fetchall())
        finally:
            cur.close()

    def _load(
        self, raw: Any, ref: str, now_ms: int, ruleset: CompiledRuleset, mark: tuple[int, int] | None = None
    ) -> DecisionInputs | None:
        """Resolve ``ref`` and load the profile with driver-level statements (as ``load_profile`` reads it)."""
        loaded = self.clock()
        found = dict(
            self._query(
                raw,
                "SELECT kind, customer_id FROM identities WHERE value = ? AND kind IN ('user', 'anonymous')",
                ref,
            )
        )
        customer_id = found.get("user", found.get("anonymous"))
        if customer_id is None:
            self.forget(ref)
            return None
        # The stamp first, then the profile it guards (one snapshot on SQLite; on PostgreSQL the
        # profile is read after the stamp, so as new or newer): a change committed in between
        # shows as a different stamp next time, never as a stale profile kept.
        rows = self._check(raw, customer_id, now_ms)
        stamp = _stamp_of(rows)
        seen = {customer_id}
        while stamp[2] is not None and stamp is not _ERASED:  # merged: follow to the customer it joined
            nxt = int(stamp[2])
            if nxt in seen:
                break
            seen.add(nxt)
            customer_id = nxt
            rows = self._check(raw, customer_id, now_ms)
            stamp = _stamp_of(rows)
        profile = self._profile(raw, customer_id)
        if stamp is not _ERASED:
            self._store(ref, _Entry(customer_id, profile, stamp, loaded))
            self._trust(customer_id, rows, now_ms - HISTORY_MS, mark)
        return DecisionInputs(customer_id, profile, history_from_rows(rows, ruleset), False)

    def _profile(self, raw: Any, customer_id: int) -> StoredProfile:
        row = self._query(
            raw,
            "SELECT traits, timezone, first_seen_ms, last_seen_ms FROM profiles WHERE customer_id = ?",
            customer_id,
        )
        stats = {
            event: (count, total, first, last, last_value)
            for event, count, total, first, last, last_value in self._query(
                raw,
                "SELECT event, count, sum_value, first_ms, last_ms, last_value FROM profile_event_stats "
                "WHERE customer_id = ?",
                customer_id,
            )
        }
        days: dict[str, dict[int, tuple[int, float]]] = {}
        for event, day, count, total in self._query(
            raw, "SELECT event, day, count, sum_value FROM profile_daily WHERE customer_id = ?", customer_id
        ):
            days.setdefault(event, {})[day] = (count, total)
        consent_rows = self._query(
            raw, "SELECT channel, granted, source FROM consent WHERE customer_id = ?", customer_id
        )
        consent = {channel: bool(granted) for channel, granted, _source in consent_rows}
        bounced = undeliverable(consent_rows)
        arms = {
            campaign: bool(held)
            for campaign, held in self._query(
                raw, "SELECT campaign, held FROM arm_assignments WHERE customer_id = ?", customer_id
            )
        }
        traits: Any = row[0][0] if row else None
        if isinstance(traits, str | bytes):
            traits = orjson.loads(traits)
        return StoredProfile(
            customer_id=customer_id,
            traits=dict(traits or {}),
            timezone=row[0][1] if row else None,
            stats=stats,
            days=days,
            consent=consent,
            first_seen_ms=row[0][2] if row else None,
            last_seen_ms=row[0][3] if row else None,
            undeliverable=bounced,
            arms=arms,
        )


_STATES: weakref.WeakSet[DecisionState] = weakref.WeakSet()


def _listen_forever(ref: weakref.ref[DecisionState], stop: threading.Event) -> None:
    """The listener thread of the cache ``ref`` names: until stopped, or the cache is gone.

    It holds the cache only while it handles a notification, so a cache dropped without
    :meth:`DecisionState.close` (an app never shut down) is collected and its thread ends.
    A failure (the server restarted, the network) is logged once per outage; the thread
    tries again after 1 s, doubling to 30 s while it keeps failing.
    """
    failures = 0
    while not stop.is_set():
        state, conn = ref(), None
        if state is None:
            return
        try:
            conn = state._connect_listener()
            if conn is None:
                log.warning(
                    "decision cache: the change triggers (migration notify13_0004) are missing; "
                    "every preview checks its customer"
                )
                del state
                stop.wait(60.0)
                continue
            if failures:
                log.warning(
                    "decision cache: the listener is back; previews of unchanged customers skip the check"
                )
            failures = 0
            del state
            while not stop.is_set() and ref() is not None:
                for notify in conn.notifies(timeout=0.5):  # each as it arrives; every 0.5 s at least
                    state = ref()
                    if state is None:
                        break
                    state._notified(notify.payload)
                    del state
        except Exception:  # noqa: BLE001 - previews check their customers until we are back
            failures += 1
            if failures == 1 and not stop.is_set():
                log.warning(
                    "decision cache: the listener failed; previews check until it is back", exc_info=True
                )
        finally:
            state = ref()
            if state is not None:
                state._listener_lost(conn)
            elif conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            del state
        stop.wait(min(30.0, 2.0 ** max(failures - 1, 0)))


def committed_sends(customer_id: int) -> None:
    """A send of ``customer_id`` was committed by this process: no cache of it may skip the check now."""
    for state in list(_STATES):
        state.invalidate((customer_id,))


def _after_fork() -> None:
    # A listener thread does not survive a fork: the child's caches start their own when used.
    for state in list(_STATES):
        state._listener = None
        state._listening = False
        state.listening.clear()
        state._clean.clear()


os.register_at_fork(after_in_child=_after_fork)


class _ThreadConnection:
    """One thread's own connection, closed when this (kept only in the thread's local storage) goes."""

    __slots__ = ("__weakref__", "raw", "release")

    def __init__(self, raw: Any, raws: list[Any], lock: threading.Lock) -> None:
        self.raw = raw
        #: Closes the connection once (now, or when this object is collected): not self, so the
        #: cache itself is not kept alive by a thread that used it.
        self.release = weakref.finalize(self, _release, raws, lock, raw)


def _release(raws: list[Any], lock: threading.Lock, raw: Any) -> None:
    """Close ``raw`` and forget it, unless the cache closed it (with every other) already."""
    with lock:
        try:
            raws.remove(raw)
        except ValueError:
            return
    with contextlib.suppress(Exception):  # a broken connection, or one closing at shutdown
        raw.close()


def _close_all(raws: list[Any]) -> None:
    while raws:
        with contextlib.suppress(Exception):  # closing at shutdown; nothing to recover
            raws.pop().close()


def _is_disconnect(exc: BaseException) -> bool:
    """True for a driver error that means the connection is gone (worth one retry on a new one)."""
    name = type(exc).__name__
    return name in {"OperationalError", "InterfaceError"} and "locked" not in str(exc)
