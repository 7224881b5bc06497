"""Time, in one place: a clock that tests and simulations can move.

Everything that needs "now" takes a :class:`Clock`; times travel as integer
milliseconds since the Unix epoch (UTC), as they are stored.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

__all__ = ["Clock", "FixedClock", "datetime_to_ms", "ms_to_datetime", "now_ms"]


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
