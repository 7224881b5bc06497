"""Profiles: per-customer aggregates kept by the engine loop, and the rules' view of them.

For every customer: first and last seen, event count, traits (merged from
``identify``) and time zone; per event name: count, value sum, first/last time and
last value; and per event name and UTC day: count and value sum, so windowed
aggregates (``count(x within 7d)``) read a handful of rows and never the log.

An event's *value* is the first numeric of ``properties.revenue``, ``value``,
``total``, ``price``. Pages count as ``Page Viewed`` and screens as ``Screen Viewed``.
Feedback on a message is counted under its own name and also as ``CHANNEL.KIND``
(``email.opened``, ``sms.clicked``), whatever name it arrived under, which is what
rules read (:func:`cadence.channels.feedback_aggregate`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import Connection, delete, select

from cadence.channels import FEEDBACK_EVENTS, feedback_aggregate, feedback_of
from cadence.clock import valid_zone
from cadence.engine.consent import consent_of, undeliverable
from cadence.engine.events import LoggedEvent
from cadence.runtime import Runtime
from cadence.store.fast import (
    ask_in,
    dump_json,
    execute_in,
    fetch_in,
    index_scans,
    is_postgres,
    rows_of,
    write_rows,
)
from cadence.store.schema.core import profile_daily, profile_event_stats, profiles
from cadence.store.schema.decisions import arm_assignments

__all__ = ["ProfilesSubscriber", "StoredProfile", "event_name", "event_value", "load_profile"]

log = logging.getLogger("cadence.profiles")

DAY_MS = 86_400_000
VALUE_PROPERTIES = ("revenue", "value", "total", "price")


def event_name(event: LoggedEvent) -> str | None:
    """The name an event is counted under in profiles, or None (identify, alias, group).

    >>> from cadence.engine.events import LoggedEvent as E
    >>> event_name(E(1, "m", "page", None, "u", None, 1, 0, "api", {}))
    'Page Viewed'
    """
    if event.type == "track":
        return event.event
    if event.type == "page":
        return "Page Viewed"
    if event.type == "screen":
        return "Screen Viewed"
    return None


def event_value(properties: Mapping[str, Any]) -> float | None:
    """The monetary or numeric value of an event, if it has one (a finite number: ``"NaN"`` and
    ``"Infinity"`` parse as floats, and one such sum broke every later batch of the engine loop).

    >>> event_value({"revenue": "12.5"}), event_value({"total": 3}), event_value({"x": 1})
    (12.5, 3.0, None)
    >>> event_value({"revenue": "NaN", "value": 4}), event_value({"revenue": "-Infinity"}), event_value({"price": 1e999})
    (4.0, None, None)
    """
    for key in VALUE_PROPERTIES:
        raw = properties.get(key)
        if raw is None or isinstance(raw, bool):
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            return value
    return None


def counted_names(name: str, properties: Mapping[str, Any]) -> list[str]:
    """The names an event is counted under: its own, and ``CHANNEL.KIND`` for message feedback.

    >>> counted_names("Message Clicked", {"channel": "sms"}), counted_names("Order Completed", {})
    (['Message Clicked', 'sms.clicked'], ['Order Completed'])
    """
    feedback = feedback_of(name, properties)
    if feedback is None:
        return [name]
    return [name, feedback_aggregate(feedback[0], feedback[1].value)]


def _json(value: Any) -> dict[str, Any]:
    """A JSON column as fetched by the driver: text on SQLite, already decoded on PostgreSQL."""
    if value is None:
        return {}
    return value if isinstance(value, dict) else orjson.loads(value)


_PROFILE_COLUMNS = (
    ("customer_id", "bigint"),
    ("first_seen_ms", "bigint"),
    ("last_seen_ms", "bigint"),
    ("event_count", "bigint"),
    ("traits", "jsonb"),
    ("trait_events", "jsonb"),
    ("timezone", "text"),
    ("updated_event_id", "bigint"),
)
#: The same without the traits, for rows whose batch set none: :data:`_NO_TRAITS` when inserted.
_PROFILE_BARE_COLUMNS = tuple(c for c in _PROFILE_COLUMNS if c[0] not in ("traits", "trait_events"))
_NO_TRAITS = {
    "postgresql": (("traits", "'{}'::jsonb"), ("trait_events", "'{}'::jsonb")),
    "sqlite": (("traits", "'{}'"), ("trait_events", "'{}'")),
}
_PROFILE_SELECT = (
    "SELECT customer_id, first_seen_ms, last_seen_ms, event_count, traits, trait_events, timezone, "
    "updated_event_id FROM profiles WHERE customer_id IN_VALUES"
)
#: A batch's summary added to a stored profile; traits untouched.
_PROFILE_ADD = (
    "ON CONFLICT (customer_id) DO UPDATE SET"
    " first_seen_ms = CASE WHEN excluded.first_seen_ms < profiles.first_seen_ms"
    " THEN excluded.first_seen_ms ELSE profiles.first_seen_ms END,"
    " last_seen_ms = CASE WHEN excluded.last_seen_ms > profiles.last_seen_ms"
    " THEN excluded.last_seen_ms ELSE profiles.last_seen_ms END,"
    " event_count = profiles.event_count + excluded.event_count,"
    " timezone = COALESCE(excluded.timezone, profiles.timezone),"
    " updated_event_id = CASE WHEN excluded.updated_event_id > profiles.updated_event_id"
    " THEN excluded.updated_event_id ELSE profiles.updated_event_id END"
)
#: The same, with traits already merged over the stored ones.
_PROFILE_ADD_TRAITS = _PROFILE_ADD + ", traits = excluded.traits, trait_events = excluded.trait_events"
#: The same, merging the batch's traits over the stored ones in SQL, key by key (top level only):
#: ``||`` on PostgreSQL; on SQLite ``json_patch``, which equals it while no value is null or an
#: object (merge-patch deletes keys set to null and merges objects), so those rows take the read path.
_PROFILE_MERGE_TRAITS = {
    "postgresql": _PROFILE_ADD + ", traits = profiles.traits || excluded.traits,"
    " trait_events = profiles.trait_events || excluded.trait_events",
    "sqlite": _PROFILE_ADD + ", traits = json_patch(profiles.traits, excluded.traits),"
    " trait_events = json_patch(profiles.trait_events, excluded.trait_events)",
}
#: A whole profile, computed in Python.
_PROFILE_REPLACE = (
    "ON CONFLICT (customer_id) DO UPDATE SET first_seen_ms = excluded.first_seen_ms,"
    " last_seen_ms = excluded.last_seen_ms, event_count = excluded.event_count,"
    " traits = excluded.traits, trait_events = excluded.trait_events, timezone = excluded.timezone,"
    " updated_event_id = excluded.updated_event_id"
)
_STATS_COLUMNS = (
    ("customer_id", "bigint"),
    ("event", "text"),
    ("count", "bigint"),
    ("sum_value", "float8"),
    ("first_ms", "bigint"),
    ("last_ms", "bigint"),
    ("last_value", "float8"),
)
_STATS_ADD = (
    "ON CONFLICT (customer_id, event) DO UPDATE SET"
    " count = profile_event_stats.count + excluded.count,"
    " sum_value = profile_event_stats.sum_value + excluded.sum_value,"
    " first_ms = CASE WHEN excluded.first_ms < profile_event_stats.first_ms"
    " THEN excluded.first_ms ELSE profile_event_stats.first_ms END,"
    # the latest event's value; on a tie in time the larger value, so that the result does not
    # depend on the order events and merges are folded in (one by one, or a batch at once)
    " last_value = CASE WHEN excluded.last_ms > profile_event_stats.last_ms"
    " OR (excluded.last_ms = profile_event_stats.last_ms"
    " AND COALESCE(excluded.last_value, 0) > COALESCE(profile_event_stats.last_value, 0))"
    " THEN excluded.last_value ELSE profile_event_stats.last_value END,"
    " last_ms = CASE WHEN excluded.last_ms > profile_event_stats.last_ms"
    " THEN excluded.last_ms ELSE profile_event_stats.last_ms END"
)
_DAILY_COLUMNS = (
    ("customer_id", "bigint"),
    ("event", "text"),
    ("day", "integer"),
    ("count", "bigint"),
    ("sum_value", "float8"),
)
_DAILY_ADD = (
    "ON CONFLICT (customer_id, event, day) DO UPDATE SET count = profile_daily.count + excluded.count,"
    " sum_value = profile_daily.sum_value + excluded.sum_value"
)
_FIRST = itemgetter(0)


def _split(rows: list[Any], new: frozenset[int]) -> tuple[list[Any], list[Any]]:
    """``rows`` (customer id first) as (rows of stored customers, rows of ``new`` customers).

    A new customer has no stored rows: a plain insert costs PostgreSQL about 40% less
    than an upsert, which first looks for the key, then inserts speculatively (measured).

    >>> _split([[1, "a"], [2, "a"], [3, "b"]], frozenset({2}))
    ([[1, 'a'], [3, 'b']], [[2, 'a']])
    """
    if not new:
        return rows, []
    old: list[Any] = []
    fresh: list[Any] = []
    for row in rows:
        (fresh if row[0] in new else old).append(row)
    return old, fresh


def _by_customer(rows: Any) -> list[Any]:
    """``rows`` (customer id first) as a list in customer order, the order of the tables' keys.

    Upserts in key order walk the b-tree where the previous one left it, in pages still in
    the CPU's caches: on SQLite they cost about a fifth less than in hash order (measured).

    >>> _by_customer([[3, "b"], [1, "a"], [3, "a"]])
    [[1, 'a'], [3, 'b'], [3, 'a']]
    """
    ordered = list(rows)
    ordered.sort(key=_FIRST)
    return ordered


#: The time-zone values already reported as unusable (a bounded set: each is logged once per process).
_REPORTED_ZONES: set[str] = set()


def _unusable_zone(event_id: int, field_name: str, value: Any) -> None:
    """Log, once per value, that an event's time zone is not one (the API's answer says it at once;
    an import or the engine loop only here)."""
    key = repr(value)[:100]
    if key in _REPORTED_ZONES or len(_REPORTED_ZONES) >= 1000:
        return
    _REPORTED_ZONES.add(key)
    log.warning(
        "event %d: %s %s is not an IANA time zone (such as Europe/Berlin): the customer's zone is left "
        "as it was (said once per value)",
        event_id,
        field_name,
        key,
    )


class ProfilesSubscriber:
    """Keeps ``profiles``, ``profile_event_stats`` and ``profile_daily`` from the log.

    A batch is summed in memory first (one profile, one stats row per event name and one
    day bucket per name and day, per customer), then written with one statement per
    table whose upserts add the sums to the stored rows; only customers whose traits
    changed have their stored profile read, to merge the traits.
    """

    name = "profiles"

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime
        self._new: frozenset[int] = frozenset()
        self._prepared: tuple[Sequence[LoggedEvent], Any] | None = None

    def start(self, conn: Connection, checkpoint: int) -> int:
        return checkpoint

    def created(self, conn: Connection, customer_ids: frozenset[int]) -> None:
        """Customers the coming batch created: their rows are plain inserts (see :meth:`apply`)."""
        self._new = customer_ids

    def prepare(self, batch: Sequence[LoggedEvent]) -> None:
        """Sum ``batch`` now, for an :meth:`apply` of this same batch later (the loop's look-ahead).

        The sums depend on the events alone, so the loop computes them while the server is
        still executing the previous batch's writes. An :meth:`apply` of any other batch
        sums its own.
        """
        self._prepared = (batch, self._summarise(batch))

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] is batch:
            summary, stats, daily = prepared[1]
        else:
            summary, stats, daily = self._summarise(batch)
        new, self._new = self._new, frozenset()
        self._write_profiles(conn, summary, new)
        self._add_stats(conn, *_split(_by_customer(stats.values()), new))
        self._add_daily(conn, *_split(_by_customer(daily.values()), new))

    @staticmethod
    def _summarise(
        batch: Sequence[LoggedEvent],
    ) -> tuple[dict[int, list[Any]], dict[Any, list[Any]], dict[Any, list[Any]]]:
        """One batch in memory: per customer, per (customer, name), per (customer, name, day)."""
        # customer -> [first, last, count, traits, trait_events, zone, last event id]
        summary: dict[int, list[Any]] = {}
        stats: dict[tuple[int, str], list[Any]] = {}
        daily: dict[tuple[int, str, int], list[Any]] = {}
        for e in batch:
            # unpacked at once: cheaper than six look-ups by name, once per event
            eid, _m, kind, ename, _u, _a, cid, ts, _s, payload = e
            p = summary.get(cid)
            if p is None:
                p = summary[cid] = [ts, ts, 0, None, None, None, eid]
            elif ts < p[0]:
                p[0] = ts
            elif ts > p[1]:
                p[1] = ts
            p[2] += 1
            p[6] = eid
            context = payload.get("context") or {}
            zone = None
            if kind == "identify":
                traits = e.traits
                if traits:
                    if p[3] is None:
                        p[3], p[4] = {}, {}
                    p[3].update(traits)
                    p[4].update(dict.fromkeys(traits, eid))
                raw_zone = traits.get("timezone")
                zone = valid_zone(raw_zone)
                if zone is None and raw_zone is not None:
                    _unusable_zone(eid, "traits.timezone", raw_zone)
            if not zone:
                raw_zone = context.get("timezone")  # most events carry none: no call for them
                zone = valid_zone(raw_zone) if raw_zone else None
                if zone is None and raw_zone:
                    _unusable_zone(eid, "context.timezone", raw_zone)
            if zone:
                p[5] = zone
            if kind == "track":
                name = ename
            elif kind == "page":
                name = "Page Viewed"
            elif kind == "screen":
                name = "Screen Viewed"
            else:
                continue
            if name is None:
                continue
            props = payload.get("properties") or {}
            raw = props.get("revenue")  # event_value() for the common case of a numeric revenue
            value = (float(raw) if type(raw) is int or type(raw) is float else event_value(props)) or 0.0
            day = ts // DAY_MS
            for counted in counted_names(name, props) if name in FEEDBACK_EVENTS else (name,):
                s = stats.get((cid, counted))
                if s is None:
                    stats[(cid, counted)] = [cid, counted, 1, value, ts, ts, value]
                else:
                    s[2] += 1
                    s[3] += value
                    if ts < s[4]:
                        s[4] = ts
                    if ts > s[5] or (ts == s[5] and value > s[6]):
                        s[5], s[6] = ts, value
                d = daily.get((cid, counted, day))
                if d is None:
                    daily[(cid, counted, day)] = [cid, counted, day, 1, value]
                else:
                    d[3] += 1
                    d[4] += value
        return summary, stats, daily

    def _write_profiles(
        self, conn: Connection, summary: dict[int, list[Any]], new: frozenset[int] = frozenset()
    ) -> None:
        """Add each customer's batch summary to their stored profile (created if new).

        Traits merge key by key over the stored ones (the latest event wins) inside the
        upsert, without reading the stored profile; on SQLite a batch whose traits hold a
        null or an object merges those customers' traits in Python after reading them.
        Customers in ``new`` have no stored profile: theirs are plain inserts.
        """
        postgres = is_postgres(conn)
        notify_inputs(conn, summary)
        # Most customers' events in a batch set no trait: their rows leave the stored traits as
        # they are (no JSON to send, parse and merge per row) and insert empty ones when new.
        bare: list[tuple[Any, ...]] = []
        bare_fresh: list[tuple[Any, ...]] = []
        plain: list[tuple[Any, ...]] = []
        fresh: list[tuple[Any, ...]] = []
        with_traits: dict[int, list[Any]] = {}
        for cid, p in summary.items():
            traits = p[3]
            if traits is None:
                (bare_fresh if cid in new else bare).append((cid, p[0], p[1], p[2], p[5], p[6]))
                continue
            if postgres or cid in new or not any(v is None or type(v) is dict for v in traits.values()):
                row = (cid, p[0], p[1], p[2], dump_json(traits), dump_json(p[4]), p[5], p[6])
            else:
                with_traits[cid] = p
                continue
            (fresh if cid in new else plain).append(row)
        for rows in (bare, bare_fresh, plain, fresh):
            rows.sort(key=_FIRST)
        empty = _NO_TRAITS[conn.dialect.name]
        write_rows(conn, "profiles", _PROFILE_BARE_COLUMNS, bare_fresh, fixed=empty)
        write_rows(conn, "profiles", _PROFILE_COLUMNS, fresh)
        write_rows(conn, "profiles", _PROFILE_BARE_COLUMNS, bare, _PROFILE_ADD, fixed=empty)
        write_rows(conn, "profiles", _PROFILE_COLUMNS, plain, _PROFILE_MERGE_TRAITS[conn.dialect.name])
        if not with_traits:
            return
        stored = {row[0]: row for row in fetch_in(conn, _PROFILE_SELECT, with_traits)}
        rows = []
        for cid, p in with_traits.items():
            traits, trait_events = p[3], p[4]
            old = stored.get(cid)
            if old is not None:
                traits = {**_json(old[4]), **traits}
                trait_events = {**_json(old[5]), **trait_events}
            rows.append((cid, p[0], p[1], p[2], dump_json(traits), dump_json(trait_events), p[5], p[6]))
        write_rows(conn, "profiles", _PROFILE_COLUMNS, rows, _PROFILE_ADD_TRAITS)

    @staticmethod
    def _add_stats(
        conn: Connection, rows: Sequence[Sequence[Any]], fresh: Sequence[Sequence[Any]] = ()
    ) -> None:
        """Add (customer_id, event, count, sum, first_ms, last_ms, last_value) rows (unique keys);
        insert ``fresh`` ones, whose keys are known not to be stored."""
        write_rows(conn, "profile_event_stats", _STATS_COLUMNS, fresh)
        write_rows(conn, "profile_event_stats", _STATS_COLUMNS, rows, _STATS_ADD)

    @staticmethod
    def _add_daily(
        conn: Connection, rows: Sequence[Sequence[Any]], fresh: Sequence[Sequence[Any]] = ()
    ) -> None:
        """Add (customer_id, event, day, count, sum) rows (unique keys); insert ``fresh`` ones."""
        write_rows(conn, "profile_daily", _DAILY_COLUMNS, fresh)
        write_rows(conn, "profile_daily", _DAILY_COLUMNS, rows, _DAILY_ADD)

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        self.merged_many(conn, [(winner, loser)])

    def merged_many(self, conn: Connection, merges: Sequence[tuple[int, int]]) -> None:
        """Fold every loser's profile, stats and day buckets into its winner, in merge order.

        The result is the one of folding the merges one by one: the same sums, and for a
        tie on a time the larger last value, as the upserts give in any order.
        """
        if merges:
            with index_scans(conn):  # the tables may have outgrown their statistics
                self._fold(conn, merges)
            notify_inputs(conn, {c for merge in merges for c in merge})

    def _fold(self, conn: Connection, merges: Sequence[tuple[int, int]]) -> None:
        """:meth:`merged_many` of at least one merge."""
        order = {loser: i for i, (_w, loser) in enumerate(merges)}
        winner_of = {loser: winner for winner, loser in merges}
        losers = list(order)
        # The three reads asked at once: one wait for the server (pipeline mode), not three.
        stats_asked = ask_in(
            conn,
            "SELECT customer_id, event, count, sum_value, first_ms, last_ms, last_value "
            "FROM profile_event_stats WHERE customer_id IN_VALUES",
            losers,
        )
        daily_asked = ask_in(
            conn,
            "SELECT customer_id, event, day, count, sum_value FROM profile_daily WHERE customer_id IN_VALUES",
            losers,
        )
        profiles_asked = ask_in(conn, _PROFILE_SELECT, {*losers, *winner_of.values()})
        stats: dict[tuple[int, str], list[Any]] = {}
        stored = rows_of(stats_asked)
        for cid, event, count, total, first, last, last_value in sorted(stored, key=lambda r: order[r[0]]):
            winner = winner_of[cid]
            s = stats.get((winner, event))
            if s is None:
                stats[(winner, event)] = [winner, event, count, total, first, last, last_value]
                continue
            s[2] += count
            s[3] += total
            s[4] = min(s[4], first)
            if last > s[5] or (last == s[5] and (last_value or 0.0) > (s[6] or 0.0)):
                s[5], s[6] = last, last_value
        daily: dict[tuple[int, str, int], list[Any]] = {}
        stored = rows_of(daily_asked)
        for cid, event, day, count, total in sorted(stored, key=lambda r: order[r[0]]):
            winner = winner_of[cid]
            d = daily.get((winner, event, day))
            if d is None:
                daily[(winner, event, day)] = [winner, event, day, count, total]
            else:
                d[3] += count
                d[4] += total
        held = {
            row[0]: [row[0], row[1], row[2], row[3], _json(row[4]), _json(row[5]), row[6], row[7]]
            for row in rows_of(profiles_asked)
        }
        changed: dict[int, list[Any]] = {}
        for winner, loser in merges:
            old = held.pop(loser, None)
            if old is None:
                continue
            mine = held.get(winner)
            if mine is None:
                held[winner] = changed[winner] = [winner, *old[1:]]
                continue
            # Each trait keeps the value set by the latest event, as if one customer all along.
            traits, trait_events = dict(mine[4]), dict(mine[5])
            for key, eid in old[5].items():
                if eid > trait_events.get(key, -1):
                    traits[key], trait_events[key] = old[4].get(key), eid
            newer_zone = old[7] > mine[7] and old[6]
            held[winner] = changed[winner] = [
                winner,
                min(mine[1], old[1]),
                max(mine[2], old[2]),
                mine[3] + old[3],
                traits,
                trait_events,
                old[6] if newer_zone else (mine[6] or old[6]),
                max(mine[7], old[7]),
            ]
        for table in ("profile_daily", "profile_event_stats", "profiles"):
            execute_in(conn, f"DELETE FROM {table} WHERE customer_id IN_VALUES", losers)
        self._add_stats(conn, list(stats.values()))
        self._add_daily(conn, list(daily.values()))
        write_rows(
            conn,
            "profiles",
            _PROFILE_COLUMNS,
            [(*p[:4], dump_json(p[4]), dump_json(p[5]), p[6], p[7]) for p in changed.values()],
            _PROFILE_REPLACE,
        )

    def erased(self, conn: Connection, customer_id: int) -> None:
        for table in (profile_daily, profile_event_stats, profiles):
            conn.execute(delete(table).where(table.c.customer_id == customer_id))
        notify_inputs(conn, (customer_id,))


def notify_inputs(conn: Connection, customer_ids: Iterable[int]) -> None:
    """PostgreSQL: tell the decision caches that listen (once ``conn`` commits) these customers' profiles changed.

    The profile writes' own notification (channel ``cadence_inputs``, migration notify13_0004's
    ``cadence_notify_inputs``: chunks of ids, ``*`` for more than 2,000): one statement per write,
    not a trigger, because a trigger's transition tables copy whole profile rows (traits
    included): measured once, the loop's profile path fell from 21,692 to 18,985 events/s with
    them (docs/measurements.md, session 13).
    Every writer of a profile's stamp must call it (this module's and ``scheduler.seed``).
    """
    if is_postgres(conn):
        ids = sorted(customer_ids)
        if ids:
            conn.exec_driver_sql("SELECT cadence_notify_inputs(%s::bigint[])", (ids,))


@dataclass
class StoredProfile:
    """A :class:`~cadence.engine.campaign.ProfileView` over the profile tables of one customer.

    Loaded once per decision: the per-event stats and the day buckets of the last
    ``horizon_days`` are read in two queries, then every aggregate is answered in memory.
    Windows are resolved to whole UTC days at their start (``within 7d`` counts the
    7 days' buckets before ``until`` plus the current day's).
    """

    customer_id: int
    traits: Mapping[str, Any]
    timezone: str | None
    stats: dict[str, tuple[int, float, int, int, float | None]]  # count, sum, first, last, last value
    days: dict[str, dict[int, tuple[int, float]]]  # event -> day -> (count, sum)
    consent: dict[str, bool] = field(default_factory=dict)
    first_seen_ms: int | None = None
    last_seen_ms: int | None = None
    #: Channels refused by a bounce (consent source ``bounce:...``), not by the customer: decisions
    #: say "address bounced" for them, not "opted out".
    undeliverable: frozenset[str] = frozenset()
    #: The customer's first arm of each campaign with a holdout arm (True: held out), as stored in
    #: ``arm_assignments``: a visitor held out under their own id and then merged keeps that arm, where
    #: the stable hash of the id they joined may draw another (see :func:`~cadence.engine.decide.decide`).
    arms: Mapping[str, bool] = field(default_factory=dict)

    def _whole_history(self, event: str, since_ms: int, until_ms: int) -> bool:
        s = self.stats.get(event)
        return s is not None and since_ms <= s[2] and until_ms > s[3]

    def count(self, event: str, since_ms: int, until_ms: int) -> int:
        if self._whole_history(event, since_ms, until_ms):  # exact, from the running totals
            return int(self.stats[event][0])
        buckets = self.days.get(event, {})
        lo, hi = since_ms // DAY_MS, (until_ms - 1) // DAY_MS
        return sum(c for day, (c, _s) in buckets.items() if lo <= day <= hi)

    def sum(self, event: str, prop: str, since_ms: int, until_ms: int) -> float:
        if self._whole_history(event, since_ms, until_ms):
            return float(self.stats[event][1])
        buckets = self.days.get(event, {})
        lo, hi = since_ms // DAY_MS, (until_ms - 1) // DAY_MS
        return float(sum(s for day, (_c, s) in buckets.items() if lo <= day <= hi))

    def last_at(self, event: str) -> int | None:
        s = self.stats.get(event)
        return s[3] if s else None

    def first_at(self, event: str) -> int | None:
        s = self.stats.get(event)
        return s[2] if s else None

    def consented(self, channel: str) -> bool | None:
        if self.consent.get("all") is False:
            return False
        return self.consent.get(channel)


def load_profile(
    conn: Connection, customer_id: int, *, now_ms: int, horizon_days: int | None = None
) -> StoredProfile:
    """Read one customer's profile for rules and decisions (an empty one if never seen).

    Every day bucket is read unless ``horizon_days`` limits them (displays that show a
    recent period); rules may ask for any window (``within 730d``), so decisions read all.
    """
    row = conn.execute(select(profiles).where(profiles.c.customer_id == customer_id)).first()
    stats = {
        r.event: (r.count, r.sum_value, r.first_ms, r.last_ms, r.last_value)
        for r in conn.execute(
            select(profile_event_stats).where(profile_event_stats.c.customer_id == customer_id)
        )
    }
    days: dict[str, dict[int, tuple[int, float]]] = {}
    query = select(
        profile_daily.c.event, profile_daily.c.day, profile_daily.c.count, profile_daily.c.sum_value
    ).where(profile_daily.c.customer_id == customer_id)
    if horizon_days is not None:
        query = query.where(profile_daily.c.day >= now_ms // DAY_MS - horizon_days)
    for r in conn.execute(query):
        days.setdefault(r.event, {})[r.day] = (r.count, r.sum_value)
    rows = consent_of(conn, customer_id)
    consent = {ch: bool(v["granted"]) for ch, v in rows.items()}
    bounced = undeliverable((ch, v["granted"], v["source"]) for ch, v in rows.items())
    arms = {
        campaign: bool(held)
        for campaign, held in conn.execute(
            select(arm_assignments.c.campaign, arm_assignments.c.held).where(
                arm_assignments.c.customer_id == customer_id
            )
        )
    }
    return StoredProfile(
        customer_id=customer_id,
        traits=dict(row.traits or {}) if row else {},
        timezone=row.timezone if row else None,
        stats=stats,
        days=days,
        consent=consent,
        first_seen_ms=row.first_seen_ms if row else None,
        last_seen_ms=row.last_seen_ms if row else None,
        undeliverable=bounced,
        arms=arms,
    )
