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
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import orjson
from sqlalchemy import Connection, Engine

from cadence.engine.campaign import DAY_MS, CompiledRuleset
from cadence.engine.decision import PastSend
from cadence.engine.profiles import StoredProfile

__all__ = [
    "CHECK_GROUP_PG",
    "CHECK_MANY_PG",
    "CHECK_SESSION_PG",
    "HISTORY_MS",
    "DecisionInputs",
    "DecisionState",
    "check_sql",
    "history_from_rows",
]

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
#: 0.18-0.34 ms for the single check; of four: 0.31-0.33 ms against 0.8-0.9 ms. (The same
#: settings on the commit groups' writers left PostgreSQL's CPU per commit as it was, 0.59-0.60 ms.)
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

    # -- connections
    def _own_connection(self) -> Any:
        """This thread's DBAPI connection for preview reads (autocommit, detached from the pool)."""
        raw = getattr(self._local, "raw", None)
        if raw is None:
            proxied = self.engine.raw_connection()
            raw = proxied.driver_connection
            assert raw is not None
            proxied.detach()  # ours until close(): the pool neither resets nor hands it out
            if self.postgres:
                raw.autocommit = True
            self._local.raw = raw
            with self._lock:
                self._raw.append(raw)
        return raw

    def _drop_own_connection(self) -> None:
        raw = getattr(self._local, "raw", None)
        self._local.raw = None
        if raw is not None:
            with self._lock:
                if raw in self._raw:
                    self._raw.remove(raw)
            with contextlib.suppress(Exception):  # it is broken already; we only let it go
                raw.close()

    def close(self) -> None:
        """Close the cache's own connections and forget every entry."""
        with self._lock:
            self._entries.clear()
            _close_all(self._raw)

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
        entry = self._entries.get(ref)
        if entry is not None and self.clock() - entry.loaded < self.ttl_seconds:
            rows = self._check(raw, entry.customer_id, now_ms)
            if _stamp_of(rows) == entry.stamp and entry.stamp is not _ERASED:
                self.hits += 1
                return DecisionInputs(
                    entry.customer_id, entry.profile, history_from_rows(rows, ruleset), True
                )
        self.misses += 1
        if in_transaction:  # the caller's transaction: one snapshot (SQLite) or serialised (commit)
            return self._load(raw, ref, now_ms, ruleset)
        if self.postgres:
            return self._load(raw, ref, now_ms, ruleset)
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

    def _load(self, raw: Any, ref: str, now_ms: int, ruleset: CompiledRuleset) -> DecisionInputs | None:
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
        consent = {
            channel: bool(granted)
            for channel, granted in self._query(
                raw, "SELECT channel, granted FROM consent WHERE customer_id = ?", customer_id
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
        )


def _close_all(raws: list[Any]) -> None:
    while raws:
        with contextlib.suppress(Exception):  # closing at shutdown; nothing to recover
            raws.pop().close()


def _is_disconnect(exc: BaseException) -> bool:
    """True for a driver error that means the connection is gone (worth one retry on a new one)."""
    name = type(exc).__name__
    return name in {"OperationalError", "InterfaceError"} and "locked" not in str(exc)
