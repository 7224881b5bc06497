"""Two :class:`~cadence.engine.campaign.ProfileView` implementations rules can read.

:class:`MemoryProfile` holds events in memory (rule tests, benchmarks, simulations)
and answers every question exactly, as of a moment (``as_of_ms``) so tests can
travel in time. :class:`DatabaseProfile` reads the profile aggregates the engine
loop maintains (``profiles``, ``profile_event_stats``, ``profile_daily``,
``consent``) for ``cadence explain``; it never scans the event log.

Precision of :class:`DatabaseProfile`: windows are answered from daily buckets
(``profile_daily``, days since 1970-01-01 UTC), so a window edge falls on a UTC day
boundary: ``count(x within 7d)`` counts the events of the buckets whose day lies in
the window, partial first day included. ``sum(x.prop within ...)`` reads
``profile_daily.sum_value``, which the engine fills from the event's ``value``
property (``revenue`` for Segment e-commerce events) whatever ``prop`` is named,
until per-property sums are maintained for the ruleset's aggregate list.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select

from cadence.engine.profiles import counted_names
from cadence.store.schema.core import consent, profile_daily, profile_event_stats, profiles

__all__ = ["DatabaseProfile", "MemoryProfile", "ProfileEvent"]

DAY_MS = 86_400_000


@dataclass(frozen=True)
class ProfileEvent:
    """One event of an in-memory profile."""

    event: str
    ts_ms: int
    properties: Mapping[str, Any] = field(default_factory=dict)


class MemoryProfile:
    """A customer held in memory, seen as of ``as_of_ms`` (events after it are invisible).

    >>> p = MemoryProfile(1, events=[ProfileEvent("Order Completed", 1000, {"revenue": 5.0}),
    ...                              ProfileEvent("Order Completed", 2000, {"revenue": 7.0})])
    >>> p.count("Order Completed", 0, 1500), p.sum("Order Completed", "revenue", 0, 3000)
    (1, 12.0)
    >>> p.last_at("Order Completed")
    2000
    >>> p.at(1500).last_at("Order Completed")
    1000
    """

    def __init__(
        self,
        customer_id: int,
        *,
        traits: Mapping[str, Any] | None = None,
        timezone: str | None = None,
        events: Iterable[ProfileEvent] = (),
        consent: Mapping[str, bool] | None = None,
        as_of_ms: int | None = None,
    ) -> None:
        self._customer_id = customer_id
        self._traits = dict(traits or {})
        self._timezone = timezone
        self._consent = dict(consent or {})
        self.events = sorted(events, key=lambda e: e.ts_ms)
        self.as_of_ms = as_of_ms
        self._times: dict[str, list[int]] = {}
        self._values: dict[str, list[Mapping[str, Any]]] = {}
        for e in self.events:
            if as_of_ms is not None and e.ts_ms > as_of_ms:
                continue
            for name in counted_names(e.event, e.properties):
                self._times.setdefault(name, []).append(e.ts_ms)
                self._values.setdefault(name, []).append(e.properties)

    def at(self, as_of_ms: int) -> MemoryProfile:
        """The same customer seen at another moment."""
        return MemoryProfile(
            self._customer_id,
            traits=self._traits,
            timezone=self._timezone,
            events=self.events,
            consent=self._consent,
            as_of_ms=as_of_ms,
        )

    def with_event(self, event: ProfileEvent) -> MemoryProfile:
        """A copy with one more event."""
        return MemoryProfile(
            self._customer_id,
            traits=self._traits,
            timezone=self._timezone,
            events=[*self.events, event],
            consent=self._consent,
            as_of_ms=self.as_of_ms,
        )

    @property
    def customer_id(self) -> int:
        return self._customer_id

    @property
    def traits(self) -> Mapping[str, Any]:
        return self._traits

    @property
    def timezone(self) -> str | None:
        return self._timezone

    def count(self, event: str, since_ms: int, until_ms: int) -> int:
        """Events named ``event`` in ``[since_ms, until_ms)``."""
        times = self._times.get(event)
        if not times:
            return 0
        # the usual window ends now, after the last event, and often starts before the first
        hi = len(times) if times[-1] < until_ms else bisect.bisect_left(times, until_ms)
        lo = 0 if since_ms <= times[0] else bisect.bisect_left(times, since_ms)
        return hi - lo

    def sum(self, event: str, prop: str, since_ms: int, until_ms: int) -> float:
        """The sum of a numeric property over ``event``s in ``[since_ms, until_ms)``."""
        times = self._times.get(event)
        if not times:
            return 0.0
        lo, hi = bisect.bisect_left(times, since_ms), bisect.bisect_left(times, until_ms)
        total = 0.0
        for props in self._values[event][lo:hi]:
            value = props.get(prop)
            if isinstance(value, int | float) and not isinstance(value, bool):
                total += value
        return total

    def last_at(self, event: str) -> int | None:
        """When ``event`` last happened (as of ``as_of_ms``)."""
        times = self._times.get(event)
        return times[-1] if times else None

    def first_at(self, event: str) -> int | None:
        """When ``event`` first happened."""
        times = self._times.get(event)
        return times[0] if times else None

    def consented(self, channel: str) -> bool | None:
        """Consent for ``channel`` (``all`` applies to every channel)."""
        if self._consent.get("all") is False:
            return False
        return self._consent.get(channel)


class DatabaseProfile:
    """A customer read from the profile tables, loaded once (see the module docstring)."""

    def __init__(
        self,
        customer_id: int,
        traits: Mapping[str, Any],
        timezone: str | None,
        stats: Mapping[str, tuple[int, float, int, int]],
        daily: Mapping[str, list[tuple[int, int, float]]],
        consent_rows: Mapping[str, bool],
    ) -> None:
        self._customer_id = customer_id
        self._traits = traits
        self._timezone = timezone
        self._stats = stats  # event -> (count, sum_value, first_ms, last_ms)
        self._daily = daily  # event -> sorted [(day, count, sum_value)]
        self._consent = consent_rows

    @classmethod
    def load(cls, conn: Connection, customer_id: int) -> DatabaseProfile:
        """Read one customer's profile, aggregates and consent."""
        row = conn.execute(
            select(profiles.c.traits, profiles.c.timezone).where(profiles.c.customer_id == customer_id)
        ).first()
        traits = dict(row[0] or {}) if row else {}
        timezone = row[1] if row else None
        stats_table, daily_table = profile_event_stats.c, profile_daily.c
        # columns named explicitly: Row.count is the tuple method, not the "count" column
        stats = {
            event: (int(count), float(sum_value), int(first_ms), int(last_ms))
            for event, count, sum_value, first_ms, last_ms in conn.execute(
                select(
                    stats_table.event,
                    stats_table["count"],
                    stats_table.sum_value,
                    stats_table.first_ms,
                    stats_table.last_ms,
                ).where(stats_table.customer_id == customer_id)
            )
        }
        daily: dict[str, list[tuple[int, int, float]]] = {}
        for event, day, count, sum_value in conn.execute(
            select(daily_table.event, daily_table.day, daily_table["count"], daily_table.sum_value)
            .where(daily_table.customer_id == customer_id)
            .order_by(daily_table.day)
        ):
            daily.setdefault(event, []).append((int(day), int(count), float(sum_value)))
        consent_rows = {
            r.channel: bool(r.granted)
            for r in conn.execute(
                select(consent.c.channel, consent.c.granted).where(consent.c.customer_id == customer_id)
            )
        }
        return cls(customer_id, traits, timezone, stats, daily, consent_rows)

    @property
    def customer_id(self) -> int:
        return self._customer_id

    @property
    def traits(self) -> Mapping[str, Any]:
        return self._traits

    @property
    def timezone(self) -> str | None:
        return self._timezone

    def _buckets(self, event: str, since_ms: int, until_ms: int) -> list[tuple[int, int, float]]:
        days = self._daily.get(event, [])
        first, last = since_ms // DAY_MS, (until_ms - 1) // DAY_MS
        keys = [d for d, _c, _s in days]
        return days[bisect.bisect_left(keys, first) : bisect.bisect_right(keys, last)]

    def count(self, event: str, since_ms: int, until_ms: int) -> int:
        """From daily buckets; all-time questions from the running totals."""
        if since_ms <= 0 and event in self._stats and until_ms > self._stats[event][3]:
            return self._stats[event][0]
        return sum(c for _d, c, _s in self._buckets(event, since_ms, until_ms))

    def sum(self, event: str, prop: str, since_ms: int, until_ms: int) -> float:
        """``profile_daily.sum_value`` over the window (see the module docstring)."""
        if since_ms <= 0 and event in self._stats and until_ms > self._stats[event][3]:
            return self._stats[event][1]
        return float(sum(s for _d, _c, s in self._buckets(event, since_ms, until_ms)))

    def last_at(self, event: str) -> int | None:
        """``profile_event_stats.last_ms``."""
        stats = self._stats.get(event)
        return stats[3] if stats else None

    def first_at(self, event: str) -> int | None:
        """``profile_event_stats.first_ms``."""
        stats = self._stats.get(event)
        return stats[2] if stats else None

    def consented(self, channel: str) -> bool | None:
        """The ``consent`` row for the channel (``all`` overrides with a refusal)."""
        if self._consent.get("all") is False:
            return False
        return self._consent.get(channel)
