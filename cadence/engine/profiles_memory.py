"""The in-memory :class:`~cadence.engine.campaign.ProfileView`: rule tests, the simulator, benchmarks.

:class:`MemoryProfile` holds events in memory and answers every question exactly, as
of a moment (``as_of_ms``), so rule tests can travel in time.
The database view that decisions and ``cadence explain`` read is
:func:`cadence.engine.profiles.load_profile`: windows there are answered from UTC day
buckets (a window edge falls on a day boundary), questions about a whole history from
the running totals, and ``sum(x.prop ...)`` from the event's value property whatever
``prop`` is named, until per-property sums are maintained for the aggregate list.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cadence.engine.profiles import counted_names

__all__ = ["MemoryProfile", "ProfileEvent"]

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
    >>> p.consented("email") is None, MemoryProfile(2, consent={"all": False}).consented("sms")
    (True, False)
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
        self.customer_id = customer_id
        self.traits: Mapping[str, Any] = dict(traits or {})
        self.timezone = timezone
        self.consent = dict(consent or {})  # mutable: the simulator withdraws consent
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
            self.customer_id,
            traits=self.traits,
            timezone=self.timezone,
            events=self.events,
            consent=self.consent,
            as_of_ms=as_of_ms,
        )

    def with_event(self, event: ProfileEvent) -> MemoryProfile:
        """A copy with one more event."""
        return MemoryProfile(
            self.customer_id,
            traits=self.traits,
            timezone=self.timezone,
            events=[*self.events, event],
            consent=self.consent,
            as_of_ms=self.as_of_ms,
        )

    def count(self, event: str, since_ms: int, until_ms: int) -> int:
        """Events named ``event`` in ``[since_ms, until_ms)``."""
        times = self._times.get(event)
        if not times:
            return 0
        # the usual window ends now, after the last event, and often starts before the first
        hi = len(times) if times[-1] < until_ms else bisect_left(times, until_ms)
        return hi if since_ms <= times[0] else hi - bisect_left(times, since_ms)

    def sum(self, event: str, prop: str, since_ms: int, until_ms: int) -> float:
        """The sum of a numeric property over ``event``s in ``[since_ms, until_ms)``."""
        times = self._times.get(event)
        if not times:
            return 0.0
        lo, hi = bisect_left(times, since_ms), bisect_left(times, until_ms)
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
        if self.consent.get("all") is False:
            return False
        return self.consent.get(channel)
