"""An in-memory :class:`~cadence.engine.campaign.ProfileView`: for tests, rule tests and the simulator."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cadence.engine.profiles import counted_names

__all__ = ["MemoryProfile"]


@dataclass
class MemoryProfile:
    """A customer held in memory: traits, a zone, consent and a list of events.

    >>> p = MemoryProfile(customer_id=7, timezone="Europe/Berlin")
    >>> p.add("Order Completed", 1_000, {"revenue": 30.0})
    >>> p.add("Order Completed", 5_000, {"revenue": 12.5})
    >>> p.count("Order Completed", 0, 5_000), p.sum("Order Completed", "revenue", 0, 10_000)
    (1, 42.5)
    >>> p.last_at("Order Completed"), p.consented("email") is None
    (5000, True)
    """

    customer_id: int
    traits: Mapping[str, Any] = field(default_factory=dict)
    timezone: str | None = None
    consent: dict[str, bool] = field(default_factory=dict)
    events: dict[str, list[tuple[int, Mapping[str, Any]]]] = field(default_factory=dict)

    def add(self, event: str, ts_ms: int, properties: Mapping[str, Any] | None = None) -> None:
        """Record ``event`` at ``ts_ms`` (kept sorted by time), under every name profiles count it as."""
        item = (ts_ms, properties or {})
        for name in counted_names(event, item[1]):
            rows = self.events.setdefault(name, [])
            if not rows or rows[-1][0] <= ts_ms:
                rows.append(item)
            else:
                rows.insert(bisect_left([r[0] for r in rows], ts_ms), item)

    def _between(self, event: str, since_ms: int, until_ms: int) -> list[tuple[int, Mapping[str, Any]]]:
        rows = self.events.get(event, [])
        times = [r[0] for r in rows]
        return rows[bisect_left(times, since_ms) : bisect_left(times, until_ms)]

    def count(self, event: str, since_ms: int, until_ms: int) -> int:
        """How many ``event``s happened in ``[since_ms, until_ms)``."""
        return len(self._between(event, since_ms, until_ms))

    def sum(self, event: str, prop: str, since_ms: int, until_ms: int) -> float:
        """The sum of ``properties[prop]`` over ``event``s in ``[since_ms, until_ms)``."""
        total = 0.0
        for _, props in self._between(event, since_ms, until_ms):
            value = props.get(prop)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total += value
        return total

    def last_at(self, event: str) -> int | None:
        """When ``event`` last happened, or None."""
        rows = self.events.get(event)
        return rows[-1][0] if rows else None

    def first_at(self, event: str) -> int | None:
        """When ``event`` first happened, or None."""
        rows = self.events.get(event)
        return rows[0][0] if rows else None

    def consented(self, channel: str) -> bool | None:
        """The known consent for ``channel`` (an ``all`` opt-out counts), else None."""
        if self.consent.get("all") is False:
            return False
        return self.consent.get(channel)
