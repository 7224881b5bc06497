"""Send-time arithmetic: customer zones, quiet hours, candidate slots, calendar days.

Every function here is pure and works on epoch milliseconds (UTC) at the edges and
on zone-aware local datetimes inside, so daylight-saving changes are handled by
``zoneinfo`` rather than by adding hours to wall-clock times.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, time
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cadence.engine.campaign import DAY_MS, HOUR_MS, QuietHours

__all__ = [
    "candidate_slots",
    "hour_of_week",
    "is_quiet",
    "local_datetime",
    "local_day",
    "local_days",
    "local_ms",
    "next_allowed",
    "next_allowed_ms",
    "quiet_zone",
    "zone_named",
]


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def zone_named(name: str | None, fallback: str) -> ZoneInfo:
    """The zone called ``name``, or ``fallback`` when ``name`` is empty or unknown.

    A customer's bad time-zone trait must not break a decision, so an unknown name
    falls back instead of raising.

    >>> zone_named("Europe/Berlin", "UTC").key
    'Europe/Berlin'
    >>> zone_named("Mars/Olympus", "UTC").key
    'UTC'
    """
    if name:
        zone = _zone(name)
        if zone is not None:
            return zone
    return _zone(fallback) or ZoneInfo("UTC")


def quiet_zone(quiet: QuietHours, customer_zone: str | None) -> ZoneInfo:
    """The zone a campaign's quiet hours are read in for this customer."""
    return zone_named(customer_zone if quiet.use_customer_zone else None, quiet.fallback_zone)


def local_datetime(ms: int, zone: ZoneInfo) -> datetime:
    """Epoch milliseconds as a zone-aware local datetime.

    >>> local_datetime(0, ZoneInfo("Asia/Tokyo")).isoformat()
    '1970-01-01T09:00:00+09:00'
    """
    return datetime.fromtimestamp(ms / 1000, tz=zone)


def _ms(dt: datetime) -> int:
    return int(round(dt.timestamp() * 1000))


def local_day(ms: int, zone: ZoneInfo) -> int:
    """The local calendar day of ``ms`` as a proleptic ordinal (for calendar caps).

    >>> from datetime import date
    >>> berlin = ZoneInfo("Europe/Berlin")
    >>> local_day(_ms(datetime(2026, 3, 4, 23, 30, tzinfo=ZoneInfo("UTC"))), berlin) - date(2026, 3, 4).toordinal()
    1
    """
    return local_datetime(ms, zone).date().toordinal()


def is_quiet(quiet: QuietHours, local: time) -> bool:
    """True when the wall-clock time ``local`` falls inside the quiet range.

    The range is ``[start, end)`` and may wrap midnight; ``start == end`` is the whole day
    (the linter's W505: the campaign can never send).

    >>> q = QuietHours(start=time(21), end=time(8), fallback_zone="UTC")
    >>> is_quiet(q, time(22, 30)), is_quiet(q, time(7, 59)), is_quiet(q, time(8))
    (True, True, False)
    >>> is_quiet(QuietHours(start=time(8), end=time(8), fallback_zone="UTC"), time(13))
    True
    """
    start, end = quiet.start, quiet.end
    if start < end:
        return start <= local < end
    return local >= start or local < end  # wraps midnight; equal ends: every time


def next_allowed(quiet: QuietHours, local: datetime) -> datetime | None:
    """The first instant at or after ``local`` (in a ``ZoneInfo`` zone) outside the quiet hours.

    None when the quiet hours cover the whole day (no instant is ever allowed). The
    instant comes from :func:`next_allowed_ms`: first in real (UTC) order, whatever the
    wall clock does in between.

    >>> q = QuietHours(start=time(21), end=time(8), fallback_zone="UTC")
    >>> berlin = ZoneInfo("Europe/Berlin")
    >>> next_allowed(q, datetime(2026, 3, 28, 22, 30, tzinfo=berlin)).isoformat()
    '2026-03-29T08:00:00+02:00'
    >>> next_allowed(q, datetime(2026, 3, 29, 12, 0, tzinfo=berlin)).isoformat()
    '2026-03-29T12:00:00+02:00'
    """
    wall = local.timetz().replace(tzinfo=None)
    if not is_quiet(quiet, wall):
        return local
    zone = local.tzinfo
    if not isinstance(zone, ZoneInfo):
        raise TypeError(f"next_allowed needs a datetime in a ZoneInfo zone, got {local!r}")
    allowed = next_allowed_ms(quiet, _ms(local), zone)
    return None if allowed is None else local_datetime(allowed, zone)


def next_allowed_ms(quiet: QuietHours, ms: int, zone: ZoneInfo) -> int | None:
    """The first instant at or after ``ms`` whose wall-clock time in ``zone`` is outside the quiet hours.

    None when they cover the whole day. The wall clock runs evenly between two changes of the
    zone's UTC offset, so from a quiet instant the answer is where the clock next shows the
    quiet end at the current offset, unless the offset changes first: then the search goes on
    from the change. So a range that ends inside a spring-forward gap ends at the change (the
    first real instant after the gap), and one that ends inside the repeated hour of a fall-back
    night ends at the first pass of the end for an instant in the first pass, at the second for
    one in the second (never before ``ms``: a send is not deferred into the past).

    >>> q = QuietHours(start=time(22), end=time(7), fallback_zone="UTC")
    >>> next_allowed_ms(q, 23 * 3_600_000, ZoneInfo("UTC")) == 31 * 3_600_000
    True
    >>> ny = ZoneInfo("America/New_York")  # 2026-11-01: 01:00-01:59 happens twice
    >>> q = QuietHours(start=time(0), end=time(1, 30), fallback_zone="UTC")
    >>> second_0110 = _ms(datetime(2026, 11, 1, 1, 10, fold=1, tzinfo=ny))
    >>> local_datetime(next_allowed_ms(q, second_0110, ny), ny).isoformat()
    '2026-11-01T01:30:00-05:00'
    """
    if quiet.whole_day:
        return None
    start, end = _time_ms(quiet.start), _time_ms(quiet.end)
    t = ms
    # Ends after a handful of rounds: each one returns or moves ``t`` to a change of offset,
    # and a quiet range that is not the whole day ends within a day of wall-clock time.
    while True:
        offset = _offset_ms(t, zone)
        tod = (t + offset) % DAY_MS
        if not (start <= tod < end if start < end else tod >= start or tod < end):
            return t
        target = t + (end - tod) % DAY_MS
        if _offset_ms(target, zone) == offset:
            return target
        t = _offset_change(t, target, zone)


def _offset_change(after_ms: int, by_ms: int, zone: ZoneInfo) -> int:
    """The first instant in ``(after_ms, by_ms]`` with another UTC offset than ``after_ms`` (there is one).

    >>> berlin = ZoneInfo("Europe/Berlin")
    >>> _offset_change(1774742400000, 1774749600000, berlin)  # 2026-03-29 00:00..02:00 UTC
    1774746000000
    """
    offset = _offset_ms(after_ms, zone)
    lo, hi = after_ms, by_ms
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _exact_offset_ms(mid, zone) == offset:
            lo = mid
        else:
            hi = mid
    return hi


def _exact_offset_ms(ms: int, zone: ZoneInfo) -> int:
    """The UTC offset of ``zone`` at ``ms``, looked up (the cached lookups below start here)."""
    offset = local_datetime(ms, zone).utcoffset()
    return int(offset.total_seconds() * 1000) if offset is not None else 0


def _offset_ms(ms: int, zone: ZoneInfo) -> int:
    """The UTC offset of ``zone`` at ``ms``: from the memoised top-of-hour offsets where they agree.

    An instant off the hour (a decision's own time, a past send) has the offset of the hours
    around it when those two are equal (no change inside that hour; the same assumption as
    the one-offset fast path of :func:`_candidate_slots`), else it is looked up itself.

    >>> berlin = ZoneInfo("Europe/Berlin")
    >>> change = 1774746000000  # 2026-03-29 01:00 UTC: Berlin moves from +01:00 to +02:00
    >>> [_offset_ms(t, berlin) // HOUR_MS for t in (change - 1, change, change + 1)]
    [1, 2, 2]
    """
    top = ms - ms % HOUR_MS
    offset = _hour_offset_ms(top, zone)
    if top == ms or offset == _hour_offset_ms(top + HOUR_MS, zone):
        return offset
    return _instant_offset_ms(ms, zone)


@lru_cache(maxsize=1024)
def _instant_offset_ms(ms: int, zone: ZoneInfo) -> int:
    """The UTC offset at an instant off the hour (a decision's own time), asked for by several steps."""
    return _exact_offset_ms(ms, zone)


@lru_cache(maxsize=65536)
def _hour_offset_ms(ms: int, zone: ZoneInfo) -> int:
    """The UTC offset of ``zone`` at one top-of-hour instant, memoised.

    Decision windows are runs of top-of-hour instants, and consecutive decisions (and
    customers in the same zone) share most of them; the offset of each instant is exact,
    whatever DST changes the window holds.
    """
    return _exact_offset_ms(ms, zone)


def local_ms(times: Sequence[int], zone: ZoneInfo) -> list[int]:
    """Each instant of ``times`` shifted by ``zone``'s UTC offset at that instant: local wall-clock ms.

    ``local_ms // DAY_MS`` is the local day since 1970-01-01, ``local_ms % DAY_MS`` the local
    time of day; exact across DST changes (each instant gets its own offset).

    >>> berlin = ZoneInfo("Europe/Berlin")
    >>> before, after = 1774742400000, 1774746000000  # 2026-03-29 00:00 and 01:00 UTC
    >>> [(x % DAY_MS) // HOUR_MS for x in local_ms([before, after], berlin)]
    [1, 3]
    """
    hourly = _hour_offset_ms
    return [t + (hourly(t, zone) if t % HOUR_MS == 0 else _offset_ms(t, zone)) for t in times]


_EPOCH_ORDINAL = datetime(1970, 1, 1).toordinal()


def local_days(times: Sequence[int], zone: ZoneInfo) -> list[int]:
    """:func:`local_day` of each instant of ``times`` (from :func:`local_ms`: cached per hour).

    >>> berlin = ZoneInfo("Europe/Berlin")
    >>> t = _ms(datetime(2026, 3, 4, 23, 30, tzinfo=ZoneInfo("UTC")))
    >>> local_days([t], berlin) == [local_day(t, berlin)]
    True
    """
    return [loc // DAY_MS + _EPOCH_ORDINAL for loc in local_ms(times, zone)]


def _time_ms(t: time) -> int:
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 1000


def hour_of_week(ms: int, zone: ZoneInfo) -> int:
    """Local hour of the week, 0 = Monday 00:00..00:59, 167 = Sunday 23:00.

    >>> hour_of_week(0, ZoneInfo("UTC"))  # 1970-01-01 was a Thursday
    72
    """
    local = local_datetime(ms, zone)
    return local.weekday() * 24 + local.hour


def candidate_slots(
    *,
    earliest_ms: int,
    count: int,
    quiet: QuietHours | None,
    zone: ZoneInfo,
    until_ms: int | None = None,
) -> tuple[list[int], bool]:
    """Send times to consider (see :func:`_candidate_slots`), memoised.

    A push decides for many customers at the same instant and in few zones, so the
    same slots are asked for again and again; the answer is a fresh list each time.
    The earliest instant (usually the decision's own time, new on every call) is worked out
    (and memoised) apart from the top-of-hour instants after it, each of which is looked up
    where quiet hours put it (:func:`_hourly_slots`: consecutive decisions share all but one
    of them, and every decision within the same hour all of them: memoised whole), then they
    are joined as :func:`_candidate_slots` joins them (the earliest first, a later slot equal
    to it dropped).

    >>> q = QuietHours(start=time(22), end=time(7), fallback_zone="UTC")
    >>> utc = ZoneInfo("UTC")
    >>> all(
    ...     candidate_slots(earliest_ms=t, count=24, quiet=q, zone=utc)
    ...     == _candidate_slots(earliest_ms=t, count=24, quiet=q, zone=utc)
    ...     for t in range(0, 2 * DAY_MS, 1_800_000)
    ... )
    True
    """
    if count <= 1:
        slots, now_is_quiet = _memo_slots(earliest_ms, count, quiet, zone, until_ms)
        return list(slots), now_is_quiet
    head, now_is_quiet = _memo_slots(earliest_ms, 1, quiet, zone, until_ms)
    tail = list(_hourly_slots((earliest_ms // HOUR_MS + 1) * HOUR_MS, count - 1, quiet, zone, until_ms))
    if not head:
        return tail, now_is_quiet
    first = head[0]
    if first in tail:
        tail.remove(first)  # (once: the tail has no duplicates)
    tail.insert(0, first)
    return tail, now_is_quiet


#: Where each top-of-hour instant goes, by (quiet start, quiet end, action, zone), then instant:
#: itself, the instant quiet hours defer it to, or None when they drop it (bounded: cleared when full).
_HOURLY: dict[tuple[Any, ...], dict[int, int | None]] = {}
_UNKNOWN = object()


@lru_cache(maxsize=4096)
def _hourly_slots(
    first_ms: int, count: int, quiet: QuietHours | None, zone: ZoneInfo, until_ms: int | None
) -> tuple[int, ...]:
    """The slots of ``count`` top-of-hour instants from ``first_ms``, as :func:`_candidate_slots` finds them.

    Memoised whole (every decision within an hour, in a zone, asks for the same ones; the
    caller copies the tuple), and each instant's own slot (itself, deferred or dropped) too, so
    a window shifted by an hour looks up one new instant. The list is filtered by ``until_ms``
    and freed of duplicates in order.
    """
    key = (quiet.start, quiet.end, quiet.action, zone) if quiet is not None else (None, None, None, zone)
    known = _HOURLY.get(key)
    if known is None:
        if len(_HOURLY) >= 1024:
            _HOURLY.clear()
        known = _HOURLY[key] = {}
    out: list[int] = []
    seen: set[int] = set()
    for i in range(count):
        ms = first_ms + i * HOUR_MS
        got: Any = known.get(ms, _UNKNOWN)
        if got is _UNKNOWN:
            if len(known) >= 65536:
                known.clear()
            one, _ = _candidate_slots(earliest_ms=ms, count=1, quiet=quiet, zone=zone)
            got = known[ms] = one[0] if one else None
        if got is None or (until_ms is not None and got >= until_ms) or got in seen:
            continue
        seen.add(got)
        out.append(got)
    return tuple(out)


@lru_cache(maxsize=4096)
def _memo_slots(
    earliest_ms: int, count: int, quiet: QuietHours | None, zone: ZoneInfo, until_ms: int | None
) -> tuple[tuple[int, ...], bool]:
    slots, now_is_quiet = _candidate_slots(
        earliest_ms=earliest_ms, count=count, quiet=quiet, zone=zone, until_ms=until_ms
    )
    return tuple(slots), now_is_quiet


#: Where a quiet instant is deferred to, by (quiet start, quiet end, zone, instant): decision
#: windows are runs of top-of-hour instants, so the same quiet instants come back call after call.
_DEFERRED: dict[tuple[time, time, ZoneInfo, int], int] = {}


def _deferred_ms(quiet: QuietHours, ms: int, zone: ZoneInfo) -> int:
    """``next_allowed`` of a quiet instant in epoch ms, memoised for top-of-hour instants (bounded:
    cleared when full). A decision's own instant, new every time, is worked out and not kept."""
    key = (quiet.start, quiet.end, zone, ms)
    got = _DEFERRED.get(key)
    if got is None:
        allowed = next_allowed_ms(quiet, ms, zone)
        assert allowed is not None, "a whole-day quiet range defers nothing: the caller drops the slot"
        got = allowed
        if ms % HOUR_MS == 0:
            if len(_DEFERRED) >= 65536:
                _DEFERRED.clear()
            _DEFERRED[key] = got
    return got


def _candidate_slots(
    *,
    earliest_ms: int,
    count: int,
    quiet: QuietHours | None,
    zone: ZoneInfo,
    until_ms: int | None = None,
) -> tuple[list[int], bool]:
    """Send times to consider: ``earliest_ms``, then the next ``count - 1`` top-of-hour instants.

    Slots inside quiet hours are moved to the next allowed time (``defer``) or removed
    (``drop``); duplicates collapse. Slots at or after ``until_ms`` (the campaign's end)
    are removed. Returns ``(slots, now_is_quiet)`` where the flag says whether the
    earliest instant itself fell inside quiet hours.

    >>> q = QuietHours(start=time(22), end=time(7), fallback_zone="UTC")
    >>> slots, quiet_now = candidate_slots(earliest_ms=21 * HOUR_MS, count=3, quiet=q, zone=ZoneInfo("UTC"))
    >>> [s // HOUR_MS for s in slots], quiet_now
    ([21, 31], False)
    """
    raw = [earliest_ms]
    first_hour = (earliest_ms // HOUR_MS + 1) * HOUR_MS
    raw.extend(first_hour + i * HOUR_MS for i in range(max(count - 1, 0)))
    now_is_quiet = False
    out: list[int] = []
    seen: set[int] = set()
    # Fast path: one UTC offset across the whole window (no DST change inside it), so the
    # local time of day is plain arithmetic; only quiet slots need the calendar.
    offset = _offset_ms(raw[0], zone)
    constant = offset == _offset_ms(raw[-1], zone)
    start_ms = _time_ms(quiet.start) if quiet is not None else 0
    end_ms = _time_ms(quiet.end) if quiet is not None else 0
    deferred: dict[int, int] = {}
    for i, ms in enumerate(raw):
        if quiet is not None:
            if constant:
                tod = (ms + offset) % DAY_MS
                # (equal ends wrap: the whole day is quiet)
                inside = start_ms <= tod < end_ms if start_ms < end_ms else tod >= start_ms or tod < end_ms
            else:
                inside = is_quiet(quiet, local_datetime(ms, zone).timetz().replace(tzinfo=None))
            if inside:
                if i == 0:
                    now_is_quiet = True
                if quiet.action == "drop" or quiet.whole_day:
                    continue
                # Every slot of one quiet stretch defers to the same instant: compute it once.
                key = (ms + offset) // DAY_MS * 2 + (
                    1 if constant and (ms + offset) % DAY_MS >= start_ms else 0
                )
                target = deferred.get(key) if constant else None
                if target is None:
                    target = _deferred_ms(quiet, ms, zone)
                    if constant:
                        deferred[key] = target
                ms = target
        if until_ms is not None and ms >= until_ms:
            continue
        if ms not in seen:
            seen.add(ms)
            out.append(ms)
    return out, now_is_quiet
