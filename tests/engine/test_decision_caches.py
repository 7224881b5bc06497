"""The caches behind decide() and the learners' scoring give what the uncached arithmetic gives."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from datetime import time as dtime
from zoneinfo import ZoneInfo

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cadence.engine.campaign import (
    DAY_MS,
    HOUR_MS,
    Campaign,
    Cap,
    ChannelPolicy,
    CompiledRuleset,
    GlobalSettings,
    QuietHours,
    TemplateSpec,
)
from cadence.engine.decide import _cap_blocked, _window_peak, decide
from cadence.engine.decision import PastSend
from cadence.engine.learners import _INSTANT_ROW, DecisionLearner, HourPreference, _time_code, _time_parts
from cadence.engine.profiles_memory import MemoryProfile
from cadence.engine.slots import (
    _DEFERRED,
    _candidate_slots,
    candidate_slots,
    is_quiet,
    local_datetime,
    local_ms,
    next_allowed,
    zone_named,
)

ZONES = (
    "Europe/Berlin",
    "America/New_York",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "UTC",
)
# 2026 DST changes: Europe 29 Mar / 25 Oct, US 8 Mar / 1 Nov, Australia 5 Apr / 4 Oct.
DST_DAYS = [
    datetime(2026, m, d, tzinfo=UTC) for m, d in ((3, 8), (3, 29), (4, 5), (10, 4), (10, 25), (11, 1))
]


NOW = int(datetime(2026, 3, 28, 12, tzinfo=UTC).timestamp() * 1000)  # the day before Europe's DST change


def _window(earliest: int, count: int = 24) -> tuple[int, ...]:
    first = (earliest // HOUR_MS + 1) * HOUR_MS
    return (earliest, *(first + i * HOUR_MS for i in range(count - 1)))


@settings(max_examples=60, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    day=st.sampled_from(DST_DAYS),
    offset_min=st.integers(min_value=-36 * 60, max_value=36 * 60),
    second=st.integers(min_value=0, max_value=59_999),
)
def test_local_ms_matches_zoneinfo_across_dst(zone: str, day: datetime, offset_min: int, second: int) -> None:
    """Each instant of a window that holds a DST change gets its own offset, as zoneinfo says."""
    tz = zone_named(zone, "UTC")
    earliest = int(day.timestamp() * 1000) + offset_min * 60_000 + second
    times = _window(earliest)
    for _ in range(2):  # the second call is answered from the per-hour offset cache
        got = local_ms(times, tz)
        for t, loc in zip(times, got, strict=True):
            local = local_datetime(t, tz)
            assert loc // DAY_MS == local.date().toordinal() - datetime(1970, 1, 1).toordinal()
            minutes = (loc % DAY_MS) // 60_000
            assert (minutes // 60, minutes % 60) == (local.hour, local.minute)


@settings(max_examples=40, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    day=st.sampled_from(DST_DAYS),
    offset_min=st.integers(min_value=-36 * 60, max_value=36 * 60),
)
def test_time_parts_match_the_per_instant_features_across_dst(
    zone: str, day: datetime, offset_min: int
) -> None:
    """The learners' time features of a slot window equal the features of each instant's local time."""
    tz = zone_named(zone, "UTC")
    times = _window(int(day.timestamp() * 1000) + offset_min * 60_000 + 1234)
    harm, _, hours, _ = _time_parts(zone, times)
    again, _, _, _ = _time_parts(zone, times[1:])  # a shifted window shares the cached table rows
    for i, t in enumerate(times):
        local = local_datetime(t, tz)
        hour = local.hour + local.minute / 60
        assert hours[i] == hour
        assert tuple(harm[i]) == _time_code(hour, local.weekday() >= 5)
        assert harm[i][int(hour)] == 1.0 and math.isclose(harm[i][24], math.cos(2 * math.pi * hour / 24))
        if i:
            assert tuple(again[i - 1]) == tuple(harm[i])


def test_time_rows_keep_send_times_not_each_decisions_own_instant() -> None:
    """Every decision's window starts at its own instant: those are worked out, not kept (the
    per-zone memo grew by one entry a decision); the top-of-hour send times are kept."""
    zone = "Pacific/Chatham"  # (+12:45/+13:45: no other test fills its memo)
    start = int(datetime(2026, 4, 5, 12, 0, tzinfo=UTC).timestamp() * 1000)  # DST ends that day
    for i in range(500):
        times = _window(start + i * 61_001)
        harm, _, hours, _ = _time_parts(zone, times)
        local = local_datetime(times[0], zone_named(zone, "UTC"))
        assert hours[0] == local.hour + local.minute / 60  # the own instant's features, still right
        assert tuple(harm[0]) == _time_code(hours[0], local.weekday() >= 5)
    kept = _INSTANT_ROW[zone]
    assert all(t % HOUR_MS == 0 for t in kept)
    assert len(kept) < 40  # the hours of 500 decisions' windows over 8.5 hours, not 500 own instants


def test_deferrals_keep_send_times_not_each_decisions_own_instant() -> None:
    """A decision made inside quiet hours defers its own instant: worked out, not kept."""
    quiet = QuietHours(start=dtime(21, 17), end=dtime(8, 43), fallback_zone="UTC")  # (no other test's)
    zone = ZoneInfo("Europe/Berlin")
    start = int(datetime(2026, 3, 28, 21, 30, tzinfo=UTC).timestamp() * 1000)  # DST starts that night
    for i in range(300):
        earliest = start + i * 61_001
        got = candidate_slots(earliest_ms=earliest, count=24, quiet=quiet, zone=zone)
        assert got == _candidate_slots(earliest_ms=earliest, count=24, quiet=quiet, zone=zone)
        assert got[1]  # the decision's own instant is quiet (each of these five hours)
    kept = [key[3] for key in _DEFERRED if key[:3] == (quiet.start, quiet.end, zone)]
    assert kept and all(ms % HOUR_MS == 0 for ms in kept)


@settings(max_examples=200, deadline=None)
@given(
    points=st.lists(st.integers(min_value=0, max_value=60), max_size=12),
    values=st.lists(st.integers(min_value=-5, max_value=70), min_size=1, max_size=10),
    width=st.integers(min_value=1, max_value=20),
    count=st.integers(min_value=1, max_value=5),
)
def test_cap_bisection_matches_the_window_scan(
    points: list[int], values: list[int], width: int, count: int
) -> None:
    """The per-slot cap verdict from the sorted sends equals the scan over every window holding the slot."""
    expected = [_window_peak(points, t, width) >= count for t in values]
    assert _cap_blocked(sorted(points), values, width, count) == expected


def test_rules_worked_out_once_per_slot_list_stay_per_cap_and_campaign() -> None:
    """Campaigns sharing one slot list reuse a verdict only for the same rule: each cap still counts its own sends."""
    sent = [PastSend(ts_ms=NOW - 60_000, campaign="a", channel="email")]
    one_a_day = (Cap(count=1, window_ms=DAY_MS),)  # campaign scope: counts the campaign's own sends
    ruleset = CompiledRuleset(
        hash="h",
        campaigns={
            name: Campaign(
                name=name,
                title=name,
                priority=1,
                audience=None,
                template=TemplateSpec("t"),
                channels=ChannelPolicy(("email", "sms"), mode="best"),
                caps=one_a_day,
            )
            for name in ("a", "b")
        },
        segments={},
        settings=GlobalSettings(caps=(Cap(count=1, window_ms=DAY_MS, scope="channel", channel="sms"),)),
        aggregates=frozenset(),
    )
    history = [*sent, PastSend(ts_ms=NOW - 120_000, campaign="x", channel="sms")]
    d = decide(
        ruleset=ruleset,
        profile=MemoryProfile(customer_id=3, timezone="Europe/Berlin"),
        now_ms=NOW,
        history=history,
        available_channels={"email", "sms"},
        scorer=DecisionLearner(),
    )
    # a: its own cap blocks every channel until a day after its send; b: only sms is capped.
    assert {(s.campaign, s.reason, s.channel) for s in d.suppressions if s.reason == "cap"} == {
        ("a", "cap", "email"),
        ("a", "cap", "sms"),
        ("b", "cap", "sms"),
    }
    assert {c.campaign for c in d.candidates} == {"b"} and {c.channel for c in d.candidates} == {"email"}
    assert all(c.send_at_ms >= NOW for c in d.candidates)


def _slots_by_hand(earliest: int, quiet: QuietHours, zone: ZoneInfo) -> tuple[list[int], bool]:
    """Each slot's local time through zoneinfo, quiet ones moved with next_allowed, duplicates dropped."""
    out: list[int] = []
    now_quiet = False
    for i, t in enumerate(_window(earliest)):
        local = local_datetime(t, zone)
        if is_quiet(quiet, local.timetz().replace(tzinfo=None)):
            now_quiet = now_quiet or i == 0
            if quiet.action == "drop":
                continue
            t = int(round(next_allowed(quiet, local).timestamp() * 1000))
        if t not in out:
            out.append(t)
    return out, now_quiet


@settings(max_examples=60, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    day=st.sampled_from(DST_DAYS),
    offset_min=st.integers(min_value=-36 * 60, max_value=36 * 60),
    start=st.integers(min_value=0, max_value=47),
    length=st.integers(min_value=1, max_value=30),
    drop=st.booleans(),
)
def test_memoised_slots_and_deferrals_match_zoneinfo_across_dst(
    zone: str, day: datetime, offset_min: int, start: int, length: int, drop: bool
) -> None:
    """Slots (memoised per window, deferral targets memoised per instant) equal the slot-by-slot arithmetic."""
    quiet = QuietHours(
        start=dtime(start // 2, 30 * (start % 2)),
        end=dtime((start + length) % 48 // 2, 30 * ((start + length) % 2)),
        fallback_zone="UTC",
        action="drop" if drop else "defer",
    )
    tz = zone_named(zone, "UTC")
    earliest = int(day.timestamp() * 1000) + offset_min * 60_000 + 4321
    expected = _slots_by_hand(earliest, quiet, tz)
    for _ in range(2):  # the second call is answered from the caches
        assert candidate_slots(earliest_ms=earliest, count=24, quiet=quiet, zone=tz) == expected


def test_hour_priors_are_a_function_of_the_labels_learned_not_of_when_they_were_read() -> None:
    """The prior kept per trait-bucket tuple is refreshed by learning only: a learner read after every
    label (a serving one) and one that replayed the same labels without a read (after a restart) value
    every hour alike, exactly, with and without a draw, and through a pickled snapshot. Before, a read
    refreshed the rows' lifts once 20 sends had passed since the last read, so the restarted learner's
    priors differed from the ones served just before (seen by an outside checker's previews)."""
    import pickle

    def make() -> HourPreference:
        return HourPreference(width=2.5, floor=0.2, strength=20.0, power=1.3)

    rng = np.random.default_rng(5)
    noise = rng.standard_normal(24)
    labels = [
        ([4, 9] if step else [4], (14 + k) % 24 if k % 3 else 20, k % 5 == 0)
        for step in range(3)
        for k in range(400)
    ]
    served, replayed = make(), make()
    for n, (buckets, hour, clicked) in enumerate(labels):
        served.learn(buckets, hour, clicked)
        served.log_prior([4, 9], noise)  # every decision reads the prior
        served.log_prior([4])
        if n == 700:
            served = pickle.loads(pickle.dumps(served))  # a snapshot, loaded
    for buckets, hour, clicked in labels:
        replayed.learn(buckets, hour, clicked)
    for key in ([4, 9], [4], [9], [], [7]):
        assert np.array_equal(served.log_prior(key), replayed.log_prior(key)), key
        assert np.array_equal(served.log_prior(key, noise), replayed.log_prior(key, noise)), key
    # the population moved the prior, and it stays within a refresh of the counts it has now
    fresh = make()
    fresh.clicks[:], fresh.sends[:] = served.clicks, served.sends
    for row in (0, 5, 10):  # computed from the counts as they are now
        fresh._compute_row(row)
    assert not np.allclose(served.log_prior([4, 9]), make().log_prior([4, 9]))
    assert np.allclose(served.log_prior([4, 9]), fresh.log_prior([4, 9]), rtol=0, atol=0.15)


@settings(max_examples=80, deadline=None)
@given(
    zone=st.sampled_from((*ZONES, "Not/AZone")),
    day=st.sampled_from(DST_DAYS),
    offset_min=st.integers(min_value=-36 * 60, max_value=36 * 60),
    milli=st.integers(min_value=0, max_value=59_999),
)
def test_memoised_time_texts_match_formatting_them_across_dst(
    zone: str, day: datetime, offset_min: int, milli: int
) -> None:
    """The explanation's and the answer's time texts, looked up by (ms, zone), are those formatted afresh."""
    from cadence.engine.decisions_service import _iso_in
    from cadence.engine.explanation import _format_when, _when

    ms = int(day.timestamp() * 1000) + offset_min * 60_000 + milli
    tz = zone_named(zone, "Europe/Berlin")
    whole = datetime.fromtimestamp(ms // 1000, tz=tz).isoformat(timespec="seconds")
    # To the millisecond when there are any (an immediate send is due at ``at``, never before it).
    expected_iso = datetime.fromtimestamp(ms / 1000, tz=tz).isoformat(
        timespec="milliseconds" if ms % 1000 else "seconds"
    )
    for _ in range(2):  # a first call formats and keeps the text; the second looks it up
        assert _iso_in(ms, tz) == expected_iso
        assert _iso_in(ms - ms % 1000, tz) == whole
        assert _when(ms, zone, "Europe/Berlin") == _format_when(ms, zone, "Europe/Berlin")
    local = datetime.fromtimestamp(ms / 1000, tz=tz)
    assert _when(ms, zone, "Europe/Berlin")[-12:-7] == f"{local.hour:02d}:{local.minute:02d}"
