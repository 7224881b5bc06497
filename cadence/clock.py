"""Time, in one place: a clock that tests and simulations can move, and the time zones cadence reads.

Everything that needs "now" takes a :class:`Clock`; times travel as integer
milliseconds since the Unix epoch (UTC), as they are stored. A customer's zone is an IANA
name (:func:`valid_zone`); :func:`zone_warnings` names the ones a call gives that are not.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

__all__ = [
    "Clock",
    "FixedClock",
    "datetime_to_ms",
    "ms_to_datetime",
    "now_ms",
    "valid_zone",
    "zone_warnings",
]


def now_ms() -> int:
    """Milliseconds since the epoch, from the system clock."""
    return time.time_ns() // 1_000_000


def ms_to_datetime(ms: int) -> datetime:
    """An aware UTC datetime for ``ms``.

    >>> ms_to_datetime(0).isoformat()
    '1970-01-01T00:00:00+00:00'
    """
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def datetime_to_ms(value: datetime) -> int:
    """Milliseconds since the epoch for ``value``; a naive datetime is taken as UTC.

    >>> datetime_to_ms(datetime(1970, 1, 1, 0, 0, 1))
    1000
    """
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


class Clock:
    """The system clock. Subclasses move time for tests and simulations."""

    def now_ms(self) -> int:
        """Milliseconds since the epoch."""
        return now_ms()

    def now(self) -> datetime:
        """An aware UTC datetime."""
        return ms_to_datetime(self.now_ms())


class FixedClock(Clock):
    """A clock that stands still until told to move.

    >>> c = FixedClock(1000); c.advance(500); c.now_ms()
    1500
    """

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms

    def set(self, ms: int) -> None:
        """Jump to ``ms``."""
        self.ms = ms

    def advance(self, ms: int) -> None:
        """Move forward by ``ms`` milliseconds."""
        self.ms += ms


def valid_zone(name: Any) -> str | None:
    """``name`` as an IANA time zone, spelled as the database spells it (whatever the case), else None.

    >>> valid_zone("Europe/Berlin"), valid_zone("america/new_york"), valid_zone("Mars/Olympus")
    ('Europe/Berlin', 'America/New_York', None)
    """
    if not isinstance(name, str) or not name:
        return None
    if _zone_exists(name):
        return name
    return _zones_by_lower().get(name.strip().lower())


@lru_cache(maxsize=1)
def _zones_by_lower() -> dict[str, str]:
    return {zone.lower(): zone for zone in available_timezones()}


@lru_cache(maxsize=1024)
def _zone_exists(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def zone_warnings(payload: Mapping[str, Any], call_type: str) -> list[tuple[str, str]]:
    """``(field, warning)`` for each time zone a call gives that the profile cannot use (it keeps its zone).

    What the profile reads: an identify's ``traits.timezone``, any call's ``context.timezone``.

    >>> zone_warnings({"traits": {"timezone": "Mars/Olympus"}, "context": {"timezone": "UTC"}}, "identify")
    [('traits.timezone', "'Mars/Olympus' is not an IANA time zone (such as Europe/Berlin): the customer's zone is left as it was")]
    >>> zone_warnings({"context": {"timezone": "europe/berlin"}}, "track")
    []
    """
    found: list[tuple[str, str]] = []
    for field_name, bag in (("traits", payload.get("traits")), ("context", payload.get("context"))):
        if field_name == "traits" and call_type != "identify":
            continue
        zone = bag.get("timezone") if isinstance(bag, Mapping) else None
        if zone is not None and valid_zone(zone) is None:
            found.append(
                (
                    f"{field_name}.timezone",
                    f"{zone!r} is not an IANA time zone (such as Europe/Berlin): the customer's zone is left as it was",
                )
            )
    return found
