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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from sqlalchemy import Connection, delete, select

from cadence.channels import feedback_aggregate, feedback_of
from cadence.engine.consent import consent_of
from cadence.engine.events import LoggedEvent
from cadence.runtime import Runtime
from cadence.store.fast import dump_json, execute_many, fetch_in
from cadence.store.schema.core import profile_daily, profile_event_stats, profiles

__all__ = ["ProfilesSubscriber", "StoredProfile", "event_name", "event_value", "load_profile"]

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
    """The monetary or numeric value of an event, if it has one.

    >>> event_value({"revenue": "12.5"}), event_value({"total": 3}), event_value({"x": 1})
    (12.5, 3.0, None)
    """
    for key in VALUE_PROPERTIES:
        raw = properties.get(key)
        if raw is None or isinstance(raw, bool):
            continue
        try:
            return float(raw)
        except (TypeError, ValueError):
            continue
    return None


def counted_names(name: str, properties: Mapping[str, Any]) -> list[str]:
    """The names an event is counted under: its own, and ``CHANNEL.KIND`` for message feedback.

    >>> counted_names("Message Clicked", {"channel": "sms"}), counted_names("Order Completed", {})
    (['Message Clicked', 'sms.clicked'], ['Order Completed'])
    """
    feedback = feedback_of(name, dict(properties))
    if feedback is None:
        return [name]
    return [name, feedback_aggregate(feedback[0], feedback[1].value)]


def valid_zone(name: Any) -> str | None:
    """``name`` if it is an IANA time zone, else None.

    >>> valid_zone("Europe/Berlin"), valid_zone("Mars/Olympus")
    ('Europe/Berlin', None)
    """
    if not isinstance(name, str) or not name:
        return None
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
    return name


def _json(value: Any) -> dict[str, Any]:
    """A JSON column as fetched by the driver: text on SQLite, already decoded on PostgreSQL."""
    if value is None:
        return {}
    return value if isinstance(value, dict) else orjson.loads(value)


class ProfilesSubscriber:
    """Keeps ``profiles``, ``profile_event_stats`` and ``profile_daily`` from the log."""

    name = "profiles"

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime

    def start(self, conn: Connection, checkpoint: int) -> int:
        return checkpoint

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        summary: dict[int, dict[str, Any]] = {}
        stats: dict[tuple[int, str], list[Any]] = {}
        daily: dict[tuple[int, str, int], list[float]] = {}
        for e in batch:
            p = summary.get(e.customer_id)
            if p is None:
                p = summary[e.customer_id] = {
                    "first": e.ts_ms,
                    "last": e.ts_ms,
                    "count": 0,
                    "traits": {},
                    "trait_events": {},
                    "tz": None,
                    "eid": e.id,
                }
            p["first"] = min(p["first"], e.ts_ms)
            p["last"] = max(p["last"], e.ts_ms)
            p["count"] += 1
            p["eid"] = e.id
            if e.type == "identify":
                p["traits"].update(e.traits)
                p["trait_events"].update(dict.fromkeys(e.traits, e.id))
            zone = valid_zone(e.traits.get("timezone")) if e.type == "identify" else None
            zone = zone or valid_zone(e.context.get("timezone"))
            if zone:
                p["tz"] = zone
            name = event_name(e)
            if name is None:
                continue
            value = event_value(e.properties) or 0.0
            names = counted_names(name, e.properties)
            for counted in names:
                s = stats.get((e.customer_id, counted))
                if s is None:
                    stats[(e.customer_id, counted)] = [1, value, e.ts_ms, e.ts_ms, value]
                else:
                    s[0] += 1
                    s[1] += value
                    s[2] = min(s[2], e.ts_ms)
                    if e.ts_ms >= s[3]:
                        s[3], s[4] = e.ts_ms, value
                d = daily.setdefault((e.customer_id, counted, e.ts_ms // DAY_MS), [0, 0.0])
                d[0] += 1
                d[1] += value
        self._write_profiles(conn, summary)
        self._add_stats(conn, [(c, n, *v) for (c, n), v in stats.items()])
        self._add_daily(conn, [(c, n, day, d[0], d[1]) for (c, n, day), d in daily.items()])

    def _write_profiles(self, conn: Connection, summary: dict[int, dict[str, Any]]) -> None:
        if not summary:
            return
        existing = {
            row[0]: row
            for row in fetch_in(
                conn,
                "SELECT customer_id, first_seen_ms, last_seen_ms, event_count, traits, trait_events, timezone, "
                "updated_event_id FROM profiles WHERE customer_id IN_VALUES",
                summary,
            )
        }
        rows = []
        for cid, p in summary.items():
            old = existing.get(cid)
            if old is None:
                first, last, count = p["first"], p["last"], p["count"]
                traits, trait_events, zone, eid = p["traits"], p["trait_events"], p["tz"], p["eid"]
            else:
                first, last, count = min(old[1], p["first"]), max(old[2], p["last"]), old[3] + p["count"]
                traits = {**_json(old[4]), **p["traits"]}
                trait_events = {**_json(old[5]), **p["trait_events"]}
                zone, eid = p["tz"] or old[6], max(old[7], p["eid"])
            rows.append((cid, first, last, count, dump_json(traits), dump_json(trait_events), zone, eid))
        execute_many(
            conn,
            "INSERT INTO profiles (customer_id, first_seen_ms, last_seen_ms, event_count, traits, trait_events,"
            " timezone, updated_event_id) VALUES (?, ?, ?, ?, ?::json, ?::json, ?, ?)"
            " ON CONFLICT (customer_id) DO UPDATE SET first_seen_ms = excluded.first_seen_ms,"
            " last_seen_ms = excluded.last_seen_ms, event_count = excluded.event_count,"
            " traits = excluded.traits, trait_events = excluded.trait_events, timezone = excluded.timezone,"
            " updated_event_id = excluded.updated_event_id",
            rows,
        )

    @staticmethod
    def _add_stats(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """Add (customer_id, event, count, sum, first_ms, last_ms, last_value) rows."""
        execute_many(
            conn,
            "INSERT INTO profile_event_stats (customer_id, event, count, sum_value, first_ms, last_ms, last_value)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (customer_id, event) DO UPDATE SET"
            " count = profile_event_stats.count + excluded.count,"
            " sum_value = profile_event_stats.sum_value + excluded.sum_value,"
            " first_ms = CASE WHEN excluded.first_ms < profile_event_stats.first_ms"
            " THEN excluded.first_ms ELSE profile_event_stats.first_ms END,"
            " last_value = CASE WHEN excluded.last_ms >= profile_event_stats.last_ms"
            " THEN excluded.last_value ELSE profile_event_stats.last_value END,"
            " last_ms = CASE WHEN excluded.last_ms > profile_event_stats.last_ms"
            " THEN excluded.last_ms ELSE profile_event_stats.last_ms END",
            rows,
        )

    @staticmethod
    def _add_daily(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """Add (customer_id, event, day, count, sum) rows."""
        execute_many(
            conn,
            "INSERT INTO profile_daily (customer_id, event, day, count, sum_value) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (customer_id, event, day) DO UPDATE SET count = profile_daily.count + excluded.count,"
            " sum_value = profile_daily.sum_value + excluded.sum_value",
            rows,
        )

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        stats_rows = [
            dict(r._mapping)
            for r in conn.execute(
                select(profile_event_stats).where(profile_event_stats.c.customer_id == loser)
            )
        ]
        daily_rows = [
            dict(r._mapping)
            for r in conn.execute(select(profile_daily).where(profile_daily.c.customer_id == loser))
        ]
        old = conn.execute(select(profiles).where(profiles.c.customer_id == loser)).first()
        self.erased(conn, loser)
        self._add_stats(
            conn,
            [
                (winner, r["event"], r["count"], r["sum_value"], r["first_ms"], r["last_ms"], r["last_value"])
                for r in stats_rows
            ],
        )
        self._add_daily(
            conn, [(winner, r["event"], r["day"], r["count"], r["sum_value"]) for r in daily_rows]
        )
        if old is None:
            return
        mine = conn.execute(select(profiles).where(profiles.c.customer_id == winner)).first()
        if mine is None:
            conn.execute(profiles.insert().values(**{**old._mapping, "customer_id": winner}))
            return
        # Each trait keeps the value set by the latest event, as if one customer all along.
        traits, trait_events = dict(mine.traits or {}), dict(mine.trait_events or {})
        for key, eid in (old.trait_events or {}).items():
            if eid > trait_events.get(key, -1):
                traits[key], trait_events[key] = (old.traits or {}).get(key), eid
        newer_zone = old.updated_event_id > mine.updated_event_id and old.timezone
        conn.execute(
            profiles.update()
            .where(profiles.c.customer_id == winner)
            .values(
                first_seen_ms=min(mine.first_seen_ms, old.first_seen_ms),
                last_seen_ms=max(mine.last_seen_ms, old.last_seen_ms),
                event_count=mine.event_count + old.event_count,
                traits=traits,
                trait_events=trait_events,
                timezone=old.timezone if newer_zone else (mine.timezone or old.timezone),
                updated_event_id=max(mine.updated_event_id, old.updated_event_id),
            )
        )

    def erased(self, conn: Connection, customer_id: int) -> None:
        for table in (profile_daily, profile_event_stats, profiles):
            conn.execute(delete(table).where(table.c.customer_id == customer_id))


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
    consent = {ch: bool(v["granted"]) for ch, v in consent_of(conn, customer_id).items()}
    return StoredProfile(
        customer_id=customer_id,
        traits=dict(row.traits or {}) if row else {},
        timezone=row.timezone if row else None,
        stats=stats,
        days=days,
        consent=consent,
        first_seen_ms=row.first_seen_ms if row else None,
        last_seen_ms=row.last_seen_ms if row else None,
    )
