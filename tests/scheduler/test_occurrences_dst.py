"""Schedules across daylight-saving changes: every day fires once, none hangs, none is skipped."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cadence.engine.campaign import Schedule
from cadence.scheduler.occurrences import due_zones, fire_times, iso, local_label, ms


def bounded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)``, failing the test instead of hanging it (the bug this file is about was a hang)."""
    found: list[Any] = []
    worker = threading.Thread(target=lambda: found.append(fn(*args, **kwargs)), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), f"{fn.__name__} did not return"
    return found[0]


@pytest.mark.parametrize(
    ("cron", "zone", "start", "end", "expected"),
    [
        # Fall back: 01:30 happens twice in New York on 2026-11-01, 02:30 twice in Berlin on 2026-10-25.
        ("30 1 * * *", "America/New_York", "2026-10-31T00:00", "2026-11-03T00:00", 3),
        ("30 2 * * *", "Europe/Berlin", "2026-10-24T00:00", "2026-10-27T00:00", 3),
        # Spring forward: 02:30 does not exist that day; it fires once, an hour later.
        ("30 2 * * *", "America/New_York", "2026-03-07T00:00", "2026-03-10T00:00", 3),
    ],
)
def test_a_zone_schedule_over_a_dst_change_returns_and_fires_daily(
    cron: str, zone: str, start: str, end: str, expected: int
) -> None:
    schedule = Schedule(cron, zone, "every day")
    times = bounded(fire_times, schedule, after_ms=ms(start), until_ms=ms(end))
    assert times == sorted(set(times))
    days = {local_label(t, zone)[:10] for t in times}
    assert len(days) == expected, [iso(t) for t in times]


def test_a_customer_zone_schedule_reaches_customers_on_the_spring_forward_day() -> None:
    # 02:30 does not exist in New York on 2026-03-08. A campaign-zone schedule fires at 03:30 EDT
    # (07:30Z) that day; a customer-zone one skipped those customers altogether.
    schedule = Schedule("30 2 * * *", "customer", "every day at 02:30 in customer.timezone")
    ticks = bounded(fire_times, schedule, after_ms=ms("2026-03-07T00:00"), until_ms=ms("2026-03-10T00:00"))
    fired = [t for t in ticks if due_zones(schedule, t, ["America/New_York"])]
    assert [iso(t) for t in fired] == ["2026-03-07T07:30Z", "2026-03-08T07:30Z", "2026-03-09T06:30Z"]
    zone_schedule = Schedule("30 2 * * *", "America/New_York", "every day at 02:30")
    assert fired == fire_times(
        zone_schedule, after_ms=ms("2026-03-07T00:00"), until_ms=ms("2026-03-10T00:00")
    )


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Sydney"])
def test_a_customer_zone_schedule_fires_once_a_day_all_year(zone: str) -> None:
    schedule = Schedule("0 9 * * *", "customer", "every day at 09:00 in customer.timezone")
    ticks = fire_times(
        schedule, after_ms=ms("2026-01-01T00:00"), until_ms=ms("2027-01-01T00:00"), limit=40_000
    )
    labels = [due_zones(schedule, t, [zone]).get(zone) for t in ticks]
    fired = [label for label in labels if label]
    assert len(fired) == 365 and all(label.endswith("T09:00") for label in fired)
