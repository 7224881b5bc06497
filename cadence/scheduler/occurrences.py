"""Schedule arithmetic, pure: fire times, per-customer local matches, and what a restart owes.

A campaign's :class:`~cadence.engine.campaign.Schedule` is a five-field crontab in a
zone, or in each customer's own zone (``zone == "customer"``). A campaign-zone
schedule fires at its crontab's times in that zone. A customer-zone schedule is
checked every quarter hour in UTC (every real zone's offset is a multiple of 15
minutes), and at each such tick it fires for the customers whose local time matches
the crontab.

>>> plan = plan_occurrences(
...     schedule=Schedule("0 9 * * *", "UTC", "every day at 09:00"),
...     after_ms=ms("2026-03-01T00:00"), now_ms=ms("2026-03-03T10:00"),
...     grace_ms=3_600_000, misfire="run_once")
>>> [(iso(o.fire_ms), o.action) for o in plan]
[('2026-03-01T09:00Z', 'skip'), ('2026-03-02T09:00Z', 'skip'), ('2026-03-03T09:00Z', 'run')]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]  # no stubs

from cadence.engine.campaign import Schedule
from cadence.errors import ConfigError

__all__ = [
    "CUSTOMER_ZONE",
    "Misfire",
    "Occurrence",
    "fire_times",
    "iso",
    "local_label",
    "matches_local",
    "ms",
    "next_local_run",
    "plan_occurrences",
    "tick_cron",
    "trigger_for",
]

CUSTOMER_ZONE = "customer"
Misfire = Literal["run_once", "skip"]
#: At most this many past occurrences are looked at after a long downtime.
MAX_CATCH_UP = 2000


def ms(text: str) -> int:
    """Milliseconds for an ISO-8601 time (naive means UTC): a helper for examples and tests.

    >>> ms("1970-01-01T00:00:01")
    1000
    """
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def iso(fire_ms: int) -> str:
    """The occurrence name of a fire time: ISO-8601 UTC to the minute.

    >>> iso(ms("2026-03-05T08:00"))
    '2026-03-05T08:00Z'
    """
    return datetime.fromtimestamp(fire_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%MZ")


def local_label(fire_ms: int, zone: str) -> str:
    """The wall-clock time of a fire time in ``zone``: the occurrence in idempotency keys.

    >>> local_label(ms("2026-03-05T08:00"), "Europe/Berlin")
    '2026-03-05T09:00'
    """
    return datetime.fromtimestamp(fire_ms / 1000, tz=ZoneInfo(zone)).strftime("%Y-%m-%dT%H:%M")


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def weekday_field(field: str) -> str:
    """A crontab day-of-week field (0 or 7 = Sunday) in APScheduler's day names.

    APScheduler numbers days from Monday, so crontab numbers are spelled out.

    >>> weekday_field("1-5"), weekday_field("0,6"), weekday_field("*"), weekday_field("*/2")
    ('mon,tue,wed,thu,fri', 'sun,sat', '*', 'sun,tue,thu,sat')
    """
    if field == "*":
        return field
    days: list[str] = []
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if span == "*":
            lo, hi = 0, 6
        elif "-" in span:
            a, b = span.split("-", 1)
            lo, hi = int(a), int(b)
        else:
            lo = hi = int(span)
        if not (0 <= lo <= 7 and 0 <= hi <= 7 and lo <= hi and step > 0):
            raise ValueError(f"bad day-of-week {part!r}")
        for number in range(lo, hi + 1, step):
            if _DAY_NAMES[number] not in days:
                days.append(_DAY_NAMES[number])
    return ",".join(days)


@lru_cache(maxsize=4096)
def _cron(cron: str, zone: str) -> CronTrigger:
    try:
        minute, hour, day, month, weekday = cron.split()
        return CronTrigger(
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=weekday_field(weekday),
            timezone=ZoneInfo(zone),
        )
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"schedule: bad crontab {cron!r} in zone {zone!r}: {exc}") from exc


def tick_cron(cron: str) -> str:
    """The UTC crontab that checks a customer-zone schedule: its minute, every quarter hour.

    >>> tick_cron("30 9 * * 1"), tick_cron("0 * * * *")
    ('0,15,30,45 * * * *', '0,15,30,45 * * * *')
    >>> tick_cron("10 9 * * *")
    '10,25,40,55 * * * *'
    """
    minute = cron.split()[0]
    base = int(minute) % 15 if minute.isdigit() else 0
    return ",".join(str(base + 15 * k) for k in range(4)) + " * * * *"


def trigger_for(schedule: Schedule) -> CronTrigger:
    """The APScheduler trigger that fires a schedule's job (UTC quarter hours for customer zones)."""
    if schedule.zone == CUSTOMER_ZONE:
        return _cron(tick_cron(schedule.cron), "UTC")
    return _cron(schedule.cron, schedule.zone)


def fire_times(schedule: Schedule, *, after_ms: int, until_ms: int, limit: int = MAX_CATCH_UP) -> list[int]:
    """The job's fire times in ``(after_ms, until_ms]``, the latest ``limit`` of them.

    >>> s = Schedule("0 9 * * 1-5", "Europe/Berlin", "every weekday at 09:00")
    >>> [iso(t) for t in fire_times(s, after_ms=ms("2026-03-06T00:00"), until_ms=ms("2026-03-10T00:00"))]
    ['2026-03-06T08:00Z', '2026-03-09T08:00Z']
    """
    trigger = trigger_for(schedule)
    out: list[int] = []
    cursor = datetime.fromtimestamp((after_ms + 1) / 1000, tz=UTC)
    end = datetime.fromtimestamp(until_ms / 1000, tz=UTC)
    # After a long downtime only the latest occurrences matter: start close to the end.
    cursor = max(
        cursor, end - timedelta(minutes=15 * (limit + 1)) if schedule.zone == CUSTOMER_ZONE else cursor
    )
    previous = None
    while True:
        nxt = trigger.get_next_fire_time(previous, cursor)
        if nxt is None or nxt > end:
            break
        out.append(int(nxt.timestamp() * 1000))
        previous = nxt
        # In UTC: local arithmetic drops ``fold``, so on a fall-back day ``01:30 EST + 1 s`` became
        # ``01:30:01 EDT``, an hour back, and the same fire time came again forever (a hang).
        cursor = nxt.astimezone(UTC) + timedelta(seconds=1)
    return out[-limit:]


_LOOK_BACK_MS = 75 * 60 * 1000  # a tick (15 min) and the longest daylight-saving gap (an hour)


def matches_local(schedule: Schedule, fire_ms: int, zone: str) -> bool:
    """True when a customer in ``zone`` is due at the UTC tick ``fire_ms``.

    >>> s = Schedule("0 9 * * *", "customer", "every day at 09:00 in customer.timezone")
    >>> matches_local(s, ms("2026-03-05T08:00"), "Europe/Berlin"), matches_local(s, ms("2026-03-05T08:00"), "UTC")
    (True, False)
    >>> matches_local(s, ms("2026-03-05T03:30"), "Asia/Kolkata")
    True
    """
    at = datetime.fromtimestamp(fire_ms / 1000, tz=UTC)
    nxt = _cron(schedule.cron, zone).get_next_fire_time(None, at)
    if nxt is not None and int(nxt.timestamp() * 1000) == fire_ms:
        return True
    # A time in a spring-forward gap (02:30 in New York on its change day) fires an hour later in
    # a campaign-zone schedule; asked "what fires next from this tick", it is tomorrow's, and those
    # customers skipped the day. Where the offset changed since just before the previous tick,
    # the tick matches when it is one of the zone's own fire times, looked up from before the gap.
    local = ZoneInfo(zone)
    before = at - timedelta(milliseconds=_LOOK_BACK_MS)
    if at.astimezone(local).utcoffset() == before.astimezone(local).utcoffset():
        return False
    times = fire_times(
        Schedule(schedule.cron, zone, schedule.text),
        after_ms=fire_ms - _LOOK_BACK_MS,
        until_ms=fire_ms,
        limit=8,
    )
    return bool(times) and times[-1] == fire_ms


def due_zones(schedule: Schedule, fire_ms: int, zones: Iterable[str]) -> dict[str, str]:
    """Of ``zones``, those due at ``fire_ms``, each with its local wall-clock label.

    >>> s = Schedule("0 9 * * *", "customer", "every day at 09:00 in customer.timezone")
    >>> due_zones(s, ms("2026-03-05T08:00"), ["Europe/Berlin", "Europe/Paris", "UTC"])
    {'Europe/Berlin': '2026-03-05T09:00', 'Europe/Paris': '2026-03-05T09:00'}
    """
    return {z: local_label(fire_ms, z) for z in sorted(set(zones)) if matches_local(schedule, fire_ms, z)}


def next_local_run(schedule: Schedule, now_ms: int, zones: Iterable[str]) -> int | None:
    """The next time any customer in ``zones`` is due, for a customer-zone schedule.

    >>> s = Schedule("0 9 * * *", "customer", "every day at 09:00 in customer.timezone")
    >>> iso(next_local_run(s, ms("2026-03-05T08:30"), ["Europe/Berlin", "America/New_York"]))
    '2026-03-05T14:00Z'
    """
    at = datetime.fromtimestamp(now_ms / 1000 + 0.001, tz=UTC)
    best: int | None = None
    for zone in set(zones):
        nxt = _cron(schedule.cron, zone).get_next_fire_time(None, at)
        if nxt is not None:
            value = int(nxt.timestamp() * 1000)
            best = value if best is None else min(best, value)
    return best


@dataclass(frozen=True)
class Occurrence:
    """One fire time of a job and what to do with it: ``run`` it, or record it ``skip``ped."""

    fire_ms: int
    action: Literal["run", "skip"]
    late_ms: int


def plan_occurrences(
    *, schedule: Schedule, after_ms: int, now_ms: int, grace_ms: int, misfire: Misfire
) -> list[Occurrence]:
    """What is owed for fire times in ``(after_ms, now_ms]``.

    An occurrence late by at most ``grace_ms`` runs. Older ones *misfired* (the
    process was down): with ``misfire="run_once"`` the latest of them runs once, late,
    unless an on-time occurrence supersedes it; the others, and every one with
    ``misfire="skip"``, are recorded as skipped.

    >>> s = Schedule("0 9 * * *", "UTC", "every day at 09:00")
    >>> [o.action for o in plan_occurrences(schedule=s, after_ms=ms("2026-03-01T00:00"),
    ...     now_ms=ms("2026-03-03T00:00"), grace_ms=60_000, misfire="run_once")]
    ['skip', 'run']
    >>> [o.action for o in plan_occurrences(schedule=s, after_ms=ms("2026-03-01T00:00"),
    ...     now_ms=ms("2026-03-03T00:00"), grace_ms=60_000, misfire="skip")]
    ['skip', 'skip']
    """
    if misfire not in ("run_once", "skip"):
        raise ConfigError(f"CADENCE_SCHEDULER_MISFIRE: expected run_once or skip, got {misfire!r}")
    times = fire_times(schedule, after_ms=after_ms, until_ms=now_ms)
    on_time = [t for t in times if now_ms - t <= grace_ms]
    missed = [t for t in times if now_ms - t > grace_ms]
    late_run = missed[-1] if misfire == "run_once" and missed and not on_time else None
    plan = [Occurrence(t, "run" if t == late_run else "skip", now_ms - t) for t in missed]
    plan.extend(Occurrence(t, "run", now_ms - t) for t in on_time)
    return plan


def iter_chunks(ids: list[int], size: int) -> Iterator[list[int]]:
    """``ids`` cut into lists of at most ``size``.

    >>> list(iter_chunks([1, 2, 3], 2))
    [[1, 2], [3]]
    """
    for start in range(0, len(ids), size):
        yield ids[start : start + size]
