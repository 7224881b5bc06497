"""The decision pipeline: eligibility, arms, channels, quiet hours, caps, conflicts."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, time
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cadence.engine.campaign import (
    DAY_MS,
    HOUR_MS,
    Campaign,
    Cap,
    ChannelPolicy,
    CompiledRuleset,
    ConditionResult,
    EvalContext,
    GlobalSettings,
    QuietHours,
    SplitArm,
    TemplateSpec,
    Trigger,
)
from cadence.engine.decide import decide, stable_share
from cadence.engine.decision import SUPPRESSION_REASONS, Candidate, Decision, PastSend
from cadence.engine.profiles_memory import MemoryProfile
from cadence.engine.slots import is_quiet, local_datetime, local_day


@dataclass
class Cond:
    """A hand-written predicate (the compiler's output has the same shape)."""

    source: str
    fn: Callable[[EvalContext], bool]

    def __call__(self, ctx: EvalContext) -> bool:
        return self.fn(ctx)

    def explain(self, ctx: EvalContext) -> list[ConditionResult]:
        value = self.fn(ctx)
        return [ConditionResult(text=self.source, value=value, passed=value)]


class RandomScorer:
    """Scores candidates at random (seeded): exercises every slot and channel choice."""

    def score(
        self, *, profile: Any, candidates: Sequence[Candidate], now_ms: int, seed: int
    ) -> Sequence[Candidate]:
        rng = random.Random(seed)
        return [replace(c, score=rng.uniform(0.01, 1.0)) for c in candidates]


def camp(name: str, **kw: Any) -> Campaign:
    base: dict[str, Any] = dict(
        name=name,
        title=name,
        priority=1,
        audience=None,
        template=TemplateSpec(f"t_{name}"),
        channels=ChannelPolicy(("email",)),
    )
    base.update(kw)
    return Campaign(**base)


def rules(*campaigns: Campaign, **settings_kw: Any) -> CompiledRuleset:
    return CompiledRuleset(
        hash="test",
        campaigns={c.name: c for c in campaigns},
        segments={},
        settings=GlobalSettings(**settings_kw),
        aggregates=frozenset(),
    )


def ms(text: str, zone: str = "UTC") -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp() * 1000)


NOW = ms("2026-03-04T12:00")
ALL = {"email", "sms", "push"}


def run(ruleset: CompiledRuleset, profile: MemoryProfile | None = None, **kw: Any) -> Decision:
    kw.setdefault("now_ms", NOW)
    kw.setdefault("history", [])
    kw.setdefault("available_channels", ALL)
    return decide(ruleset=ruleset, profile=profile or MemoryProfile(customer_id=1), **kw)


def test_every_suppression_reason_is_a_known_one() -> None:
    d = run(
        rules(
            camp("a", audience=Cond("vip", lambda c: bool(c.profile.traits.get("vip")))),
            camp("b", starts_ms=NOW + 1),
            camp("c", ends_ms=NOW),
            camp("d", trigger=Trigger("Cart Abandoned")),
            camp("e", unless=Cond("always", lambda c: True)),
        )
    )
    assert d.action == "none"
    assert {(s.campaign, s.reason) for s in d.suppressions} == {
        ("a", "audience"),
        ("b", "not_started"),
        ("c", "ended"),
        ("d", "trigger"),
        ("e", "unless"),
    }
    assert all(s.reason in SUPPRESSION_REASONS for s in d.suppressions)
    assert d.conditions["a"][0].value is False


def test_suppressions_say_which_condition_failed_and_when_in_words() -> None:
    """A person reads the detail: the audience's failed top-level conditions with their values (a
    segment's inner parts stay in the conditions list), and dates as local times, not epoch ms."""
    from cadence.dsl.loader import load_source

    loaded = load_source(
        'event purchased = "Order Completed"\n'
        "segment buyers = count(purchased) > 2\n"
        'campaign vip "VIP" {\n    audience  buyers and customer.tier ?? "none" == "gold"\n    send      template "t"\n'
        "    channel   email\n}\n"
        'campaign later "Later" {\n    send      template "t"\n    channel   email\n    starts    2099-03-01\n}\n'
    )
    assert not loaded.errors, loaded.errors
    d = decide(
        ruleset=loaded.ruleset,
        profile=MemoryProfile(customer_id=1, traits={"tier": "silver"}, timezone="Asia/Tokyo"),
        now_ms=NOW,
        history=[],
        available_channels=["email"],
    )
    detail = {s.campaign: s.detail for s in d.suppressions}
    assert detail["vip"] == (
        'audience not met: buyers is false, customer.tier ?? "none" == "gold" is false (value \'silver\')'
    )
    assert [(c.text, c.value, c.nested) for c in d.conditions["vip"]][:2] == [
        ("buyers", False, False),
        ("buyers > count(purchased) > 2", 0, True),
    ]
    assert detail["later"] == "starts 2099-03-01 09:00 JST"  # midnight UTC (the ruleset's zone), in Tokyo


def test_a_send_to_a_customer_without_a_known_zone_says_which_zone_it_used() -> None:
    c = camp("news", quiet=QuietHours(start=time(21), end=time(8), fallback_zone="Europe/Berlin"))
    r = rules(c, default_zone="America/New_York")
    unknown = run(r, MemoryProfile(customer_id=1, timezone="Mars/Olympus"))
    assert unknown.action == "send"
    assert unknown.notes == (
        "the customer's time zone 'Mars/Olympus' is unknown: local times and calendar caps use "
        "America/New_York (the ruleset's zone), news's quiet hours Europe/Berlin (the campaign's fallback zone); "
        "an identify with traits.timezone sets it",
    )
    assert "not known" in run(r, MemoryProfile(customer_id=1)).notes[0]
    assert run(r, MemoryProfile(customer_id=1, timezone="Asia/Tokyo")).notes == ()


def test_a_quiet_zone_said_for_an_unknown_customer_zone_is_the_campaigns_not_the_customers() -> None:
    """An outside check read "quiet hours America/New_York" as the customer's zone while the same
    summary dropped another campaign inside quiet hours in Europe/Berlin: each campaign falls back to
    its own zone, so the note names the chosen campaign's, and says nothing of a fixed zone."""
    fixed = QuietHours(start=time(21), end=time(8), fallback_zone="Asia/Tokyo", use_customer_zone=False)
    r = rules(camp("news", quiet=fixed), default_zone="America/New_York")
    note = run(r, MemoryProfile(customer_id=1, timezone="Mars/Olympus")).notes[0]
    assert "quiet hours" not in note, note  # Tokyo is the campaign's zone whatever the customer's
    own = QuietHours(start=time(21), end=time(8), fallback_zone="America/Chicago")
    r = rules(camp("news", quiet=own), default_zone="America/New_York")
    note = run(r, MemoryProfile(customer_id=1)).notes[0]
    assert "news's quiet hours America/Chicago (the campaign's fallback zone)" in note, note


def test_trigger_delay_and_where() -> None:
    c = camp(
        "cart",
        trigger=Trigger(
            "cart_abandoned",
            where=Cond("event.value >= 50", lambda x: x.event["properties"]["value"] >= 50),
            delay_ms=2 * HOUR_MS,
        ),
    )
    r = replace(rules(c), event_aliases={"cart_abandoned": "Cart Abandoned"})
    small = {"event": "Cart Abandoned", "ts_ms": NOW, "properties": {"value": 10}}
    big = {"event": "Cart Abandoned", "ts_ms": NOW, "properties": {"value": 80}}
    assert run(r, event=small).suppressed("cart", "trigger")
    d = run(r, event=big)
    assert (d.action, d.send_at_ms) == ("send", NOW + 2 * HOUR_MS)
    assert d.template == "t_cart"


def test_with_learners_a_triggered_campaign_keeps_its_time_and_the_learners_pick_the_channel() -> None:
    """'after 10m' is when the marketer wants it: the scorer may choose the channel, not move the send to
    another hour (an untriggered campaign gets the 24 hourly slots); out of quiet hours it is deferred."""
    welcome = camp(
        "welcome",
        trigger=Trigger("Signed Up", delay_ms=10 * 60_000),
        channels=ChannelPolicy(("email", "sms", "push"), mode="best"),
        quiet=QuietHours(start=time(21), end=time(8), fallback_zone="UTC"),
    )
    night = NOW - 11 * HOUR_MS  # 01:00 UTC: quiet until 08:00
    times, channels = set(), set()
    for seed in range(30):
        day = run(
            rules(welcome), event={"event": "Signed Up", "ts_ms": NOW}, scorer=RandomScorer(), seed=seed
        )
        times.add(day.send_at_ms)
        channels.add(day.channel)
        deferred = run(
            rules(welcome),
            now_ms=night,
            event={"event": "Signed Up", "ts_ms": night},
            scorer=RandomScorer(),
            seed=seed,
        )
        assert deferred.send_at_ms == ms("2026-03-04T08:00")
    assert times == {NOW + 10 * 60_000} and len(channels) > 1
    untriggered = {run(rules(camp("news")), scorer=RandomScorer(), seed=s).send_at_ms for s in range(30)}
    assert len(untriggered) > 1


def test_priority_then_name_breaks_ties_and_losers_are_explained() -> None:
    d = run(
        rules(
            camp("b", priority=5),
            camp("a", priority=5),
            camp("z", priority=9, exclusive="g"),
            camp("y", priority=1, exclusive="g"),
        )
    )
    assert d.campaign == "z"
    assert d.suppressed("y", "exclusive") and d.suppressed("a", "priority") and d.suppressed("b", "priority")
    d2 = run(rules(camp("b", priority=5), camp("a", priority=5)))
    assert d2.campaign == "a"
    assert "by name" in next(s.detail for s in d2.suppressions if s.campaign == "b")


def test_the_summary_says_each_reason_once_and_the_record_keeps_every_suppression() -> None:
    """A global push cap holds the winner's push and two other campaigns' push; they also lose on
    priority; another campaign's own cap holds all its channels: each reason is said once."""
    from cadence.engine.explanation import summarise

    channels = ChannelPolicy(("push", "email"))
    own_cap = (Cap(count=1, window_ms=7 * DAY_MS),)
    ruleset = rules(
        camp("a", priority=3, channels=channels),
        camp("b", priority=2, channels=channels, caps=own_cap),
        camp("c", channels=channels),
        camp("v", channels=channels),
        caps=(Cap(count=1, window_ms=DAY_MS, scope="channel", channel="push"),),
    )
    history = [PastSend(NOW - HOUR_MS, "b", "push")]
    d = run(ruleset, history=history)
    assert (d.campaign, d.channel) == ("a", "email")
    pushcap = {(s.campaign, s.reason, s.channel) for s in d.suppressions if "on push" in s.detail}
    assert pushcap == {("a", "cap", "push"), ("c", "cap", "push"), ("v", "cap", "push")}  # all kept
    said = summarise(d, zone="UTC")
    for detail in {s.detail for s in d.suppressions}:
        assert said.count(detail) <= 1, (detail, said)
    assert said.endswith(
        "Not chosen: a by push, and c, v (channel cap 1 per 1d on push reached); "
        "b (campaign cap 1 per 7d reached (push, email)); c, v (a has priority 3 > 1)."
    )


def test_ordered_channels_fall_back_and_skip_opted_out_bounced_and_unoffered() -> None:
    c = camp("c", channels=ChannelPolicy(("sms", "push", "email", "webhook")))
    p = MemoryProfile(customer_id=1, consent={"sms": False}, traits={"bounced": ["push"]})
    d = run(rules(c), p)
    assert d.channel == "email"
    assert d.suppressed("c", "consent") and d.suppressed("c", "bounced") and d.suppressed("c", "no_channel")
    p.consent["all"] = False
    assert run(rules(c), p).action == "none"


@pytest.mark.parametrize("bounced", [["Push", "EMAIL"], {"PUSH": True, " email ": 1, "sms": False}])
def test_a_bounced_trait_names_channels_in_any_case(bounced: object) -> None:
    """The customer's own systems may write ``"Email"``: it is email, as ingest reads channel names."""
    c = camp("c", channels=ChannelPolicy(("push", "email", "sms")))
    d = run(rules(c), MemoryProfile(customer_id=1, traits={"bounced": bounced}))
    assert d.channel == "sms" and d.suppressed("c", "bounced")


def test_a_channel_whose_connector_needs_an_opt_in_is_chosen_only_with_consent_given() -> None:
    c = camp("c", channels=ChannelPolicy(("sms", "email")))
    unknown = MemoryProfile(customer_id=1)
    assert run(rules(c), unknown).channel == "sms"  # no connector asks for an opt-in: not withdrawn is enough
    d = run(rules(c), unknown, opt_in_channels={"sms"})
    assert d.channel == "email"
    (s,) = [s for s in d.suppressions if s.channel == "sms"]
    assert s.reason == "consent" and "no opt-in for sms" in s.detail
    assert (
        run(rules(c), MemoryProfile(customer_id=1, consent={"sms": True}), opt_in_channels={"sms"}).channel
        == "sms"
    )
    both_withdrawn = MemoryProfile(customer_id=1, consent={"sms": True, "all": False})
    assert run(rules(c), both_withdrawn, opt_in_channels={"sms"}).action == "none"


def test_quiet_hours_defer_to_next_local_morning_and_drop_suppresses() -> None:
    quiet = QuietHours(start=time(21), end=time(8), fallback_zone="Europe/Berlin")
    p = MemoryProfile(customer_id=1, timezone=None)
    now = ms("2026-03-04T22:30", "Europe/Berlin")
    d = run(rules(camp("w", quiet=quiet)), p, now_ms=now)
    assert d.action == "send" and d.send_at_ms == ms("2026-03-05T08:00", "Europe/Berlin")
    assert d.suppressed("w", "quiet")
    d = run(rules(camp("w", quiet=replace(quiet, action="drop"))), p, now_ms=now)
    assert d.action == "none" and d.suppressed("w", "quiet")
    # The customer's own zone wins over the fallback: 22:30 Berlin is 16:30 in New York.
    p.timezone = "America/New_York"
    assert run(rules(camp("w", quiet=quiet)), p, now_ms=now).send_at_ms == now


def test_quiet_hours_ending_in_the_repeated_hour_defer_forward_not_into_the_past() -> None:
    """New York, 2026-11-01: 01:00-01:59 happens twice. At the second 01:10 the quiet end 01:30 still
    to come is the second one (an outside checker's D1: the send was dated at the first, 40 minutes
    before its decision); at the first 01:10, the first one."""
    ny = ZoneInfo("America/New_York")
    p = MemoryProfile(customer_id=1, timezone="America/New_York")
    nightly = camp("nightly", quiet=QuietHours(start=time(0), end=time(1, 30), fallback_zone="UTC"))
    second, first = ms("2026-11-01T06:10"), ms("2026-11-01T05:10")  # 01:10 EST, 01:10 EDT
    d = run(rules(nightly), p, now_ms=second)
    assert local_datetime(d.send_at_ms, ny).isoformat() == "2026-11-01T01:30:00-05:00"
    assert "deferred to 2026-11-01 01:30 EST" in d.suppressions[0].detail
    assert local_datetime(run(rules(nightly), p, now_ms=first).send_at_ms, ny).isoformat() == (
        "2026-11-01T01:30:00-04:00"
    )
    for seed in range(5):
        scored = run(rules(nightly), p, now_ms=second, scorer=RandomScorer(), seed=seed)
        assert scored.send_at_ms >= second
    # Triggered: the event at the second 01:00 plus 5 minutes is deferred to the second 01:30.
    rescue = camp(
        "rescue",
        trigger=Trigger("Cart Abandoned", delay_ms=5 * 60_000),
        channels=ChannelPolicy(("email", "push"), mode="best"),
        quiet=QuietHours(start=time(23), end=time(1, 30), fallback_zone="UTC"),
    )
    event = {"event": "Cart Abandoned", "ts_ms": ms("2026-11-01T06:00")}
    for scorer in (None, RandomScorer()):
        d = run(rules(rescue), p, now_ms=ms("2026-11-01T06:00"), event=event, scorer=scorer)
        assert local_datetime(d.send_at_ms, ny).isoformat() == "2026-11-01T01:30:00-05:00"
    # St John's (-02:30 summer, -03:30 winter), a learner-chosen slot: at the second 01:25, 01:45 then.
    johns = ZoneInfo("America/St_Johns")
    q = camp("q", quiet=QuietHours(start=time(1), end=time(1, 45), fallback_zone="UTC"))
    now = ms("2026-11-01T01:25", "America/St_Johns") + HOUR_MS  # the fold=0 01:25 is the first
    assert local_datetime(now, johns).isoformat() == "2026-11-01T01:25:00-03:30"
    for seed in range(5):
        d = run(
            rules(q),
            MemoryProfile(customer_id=1, timezone="America/St_Johns"),
            now_ms=now,
            scorer=RandomScorer(),
            seed=seed,
        )
        assert d.send_at_ms >= now
    d = run(rules(q), MemoryProfile(customer_id=1, timezone="America/St_Johns"), now_ms=now)
    assert local_datetime(d.send_at_ms, johns).isoformat() == "2026-11-01T01:45:00-03:30"


def test_quiet_hours_ending_in_a_spring_forward_gap_end_when_the_clock_jumps_past_them() -> None:
    """Berlin, 2026-03-29: 02:00 becomes 03:00. Quiet until 02:30 ends at 03:00 summer time, the
    first instant the clock shows an allowed time (until session 24: 03:30)."""
    quiet = QuietHours(start=time(21), end=time(2, 30), fallback_zone="Europe/Berlin")
    d = run(
        rules(camp("w", quiet=quiet)),
        MemoryProfile(customer_id=1),
        now_ms=ms("2026-03-28T22:30", "Europe/Berlin"),
    )
    assert local_datetime(d.send_at_ms, ZoneInfo("Europe/Berlin")).isoformat() == "2026-03-29T03:00:00+02:00"


@pytest.mark.parametrize("action", ["defer", "drop"])
def test_quiet_hours_with_equal_ends_cover_the_whole_day(action: str) -> None:
    """``quiet 08:00..08:00``: what the linter's W505 says (the campaign can never send), at any hour,
    deferred or dropped alike (until session 24 the range was empty and it sent at every hour)."""
    quiet = QuietHours(start=time(8), end=time(8), fallback_zone="UTC", action=action)  # type: ignore[arg-type]
    for hour in (0, 3, 8, 12, 23):
        for scorer in (None, RandomScorer()):
            d = run(rules(camp("e", quiet=quiet)), now_ms=ms(f"2026-12-01T{hour:02}:30"), scorer=scorer)
            assert d.action == "none" and d.suppressed("e", "quiet")
            assert d.suppressions[0].detail.endswith(
                "inside quiet hours 08:00..08:00 UTC (the whole day): dropped"
            )


def test_spacing_and_calendar_cap_in_customer_zone() -> None:
    tokyo = MemoryProfile(customer_id=1, timezone="Asia/Tokyo")
    sent = [PastSend(ts_ms=ms("2026-03-04T23:30", "Asia/Tokyo"), campaign="x", channel="email")]
    daily = camp("d", caps=(Cap(count=1, window_ms=DAY_MS, scope="customer", calendar=True),))
    # 2026-03-05 02:00 Tokyo is a new local day, though within 24h of the last send.
    now = ms("2026-03-05T02:00", "Asia/Tokyo")
    assert run(rules(daily), tokyo, now_ms=now, history=sent).action == "send"
    rolling = camp("d", caps=(Cap(count=1, window_ms=DAY_MS, scope="customer"),))
    assert run(rules(rolling), tokyo, now_ms=now, history=sent).suppressed("d", "cap")
    spaced = run(rules(camp("d")), tokyo, now_ms=now, history=sent, **{})
    assert spaced.action == "send"
    spaced = run(rules(camp("d"), min_spacing_ms=4 * HOUR_MS), tokyo, now_ms=now, history=sent)
    assert spaced.action == "none" and spaced.suppressed("d", "spacing")


def test_exclusive_group_already_sent_that_day() -> None:
    sent = [PastSend(ts_ms=NOW - HOUR_MS, campaign="other", channel="sms", exclusive="touch")]
    d = run(rules(camp("c", exclusive="touch")), history=sent)
    assert d.action == "none" and d.suppressed("c", "exclusive")
    assert run(rules(camp("c", exclusive="touch")), history=sent, now_ms=NOW + DAY_MS).action == "send"


def test_scorer_picks_slot_and_negative_value_suppresses() -> None:
    class PreferLate:
        def score(
            self, *, profile: Any, candidates: Sequence[Candidate], now_ms: int, seed: int
        ) -> list[Candidate]:
            return [replace(c, score=(c.send_at_ms - now_ms) / DAY_MS - 0.5) for c in candidates]

    d = run(rules(camp("c", channels=ChannelPolicy(("email", "sms"), mode="best"))), scorer=PreferLate())
    assert d.action == "send" and d.send_at_ms == (NOW // HOUR_MS + 23) * HOUR_MS
    assert len(d.candidates) == 48

    class Negative:
        def score(
            self, *, profile: Any, candidates: Sequence[Candidate], now_ms: int, seed: int
        ) -> list[Candidate]:
            return [replace(c, score=-0.1) for c in candidates]

    d = run(rules(camp("c")), scorer=Negative())
    assert d.action == "none" and d.suppressed("c", "score")


class Prefer:
    """Values each send time by ``value(minutes after now)``: a scorer whose choice a test names."""

    def __init__(self, value: Callable[[float], float]) -> None:
        self.value = value

    def score(
        self, *, profile: Any, candidates: Sequence[Candidate], now_ms: int, seed: int
    ) -> list[Candidate]:
        return [replace(c, score=self.value((c.send_at_ms - now_ms) / 60_000)) for c in candidates]


def test_a_scored_send_deferred_out_of_quiet_hours_says_so() -> None:
    """At 23:30 with quiet hours 21:00..08:00, a scorer choosing the deferred immediate send (08:00)
    is told as without a scorer: a ``quiet`` suppression of the immediate slot, and the summary says
    the time was deferred. Before, only a decision without a scorer (or a trigger) said it, and the
    server always has one: an outside check found it said for none of 45 such sends."""
    from cadence.engine.explanation import summarise

    quiet = QuietHours(start=time(21), end=time(8), fallback_zone="UTC")
    night = ms("2026-03-04T23:30")
    early = run(rules(camp("c", quiet=quiet)), now_ms=night, scorer=Prefer(lambda minutes: 1 / (1 + minutes)))
    assert (early.action, early.send_at_ms) == ("send", ms("2026-03-05T08:00"))
    [said] = [s for s in early.suppressions if s.reason == "quiet"]
    assert said.campaign == "c" and said.channel is None
    assert (
        said.detail
        == "2026-03-04 23:30 UTC is inside quiet hours 21:00..08:00 UTC: deferred to 2026-03-05 08:00 UTC"
    )
    assert "on Thu 05 Mar 08:00 +00:00 (deferred out of quiet hours)" in summarise(early, zone="UTC")
    # A later time chosen on its merits was not deferred: nothing said.
    noon = Prefer(lambda minutes: 1 / (1 + abs(minutes - 750)))
    later = run(rules(camp("c", quiet=quiet)), now_ms=night, scorer=noon)
    assert later.send_at_ms == ms("2026-03-05T12:00")
    assert not later.suppressed("c", "quiet") and "deferred" not in summarise(later, zone="UTC")


def test_a_held_back_campaign_says_its_chances_in_percent() -> None:
    """The same units as a send's summary (percentages), not fractions."""

    class Low:
        def score(
            self, *, profile: Any, candidates: Sequence[Candidate], now_ms: int, seed: int
        ) -> list[Candidate]:
            return [
                replace(c, score=-0.1345, engagement=0.007, unsubscribe=0.0142, draw=-0.13, mean=-0.1345)
                for c in candidates
            ]

    d = run(rules(camp("c")), scorer=Low())
    [held] = [s for s in d.suppressions if s.reason == "score"]
    assert (
        held.detail == "best expected value -0.1345 <= 0 (expected engagement 0.7%, unsubscribe risk 1.42%)"
    )
    # The customer's recent messages are said: the learners' fatigue and risk rise with them, and
    # an outside check's whole audience, held back for a week after two sends each, read the same
    # bare "best expected value <= 0" everywhere. A send 8 days back and one still queued do not count.
    history = [
        PastSend(ts_ms=NOW - 8 * DAY_MS, campaign="c", channel="email"),
        PastSend(ts_ms=NOW - 2 * DAY_MS, campaign="c", channel="email"),
        PastSend(ts_ms=NOW - 6 * DAY_MS, campaign="x", channel="sms"),
        PastSend(ts_ms=NOW + HOUR_MS, campaign="x", channel="sms"),
    ]
    both = run(rules(camp("c"), camp("d")), scorer=Low(), history=history)
    details = {s.campaign: s.detail for s in both.suppressions if s.reason == "score"}
    assert details["c"].endswith("unsubscribe risk 1.42%; 2 messages in the last 7 days)")
    from cadence.engine.explanation import summarise

    assert summarise(both, zone="UTC").endswith(
        "c, d: best expected value -0.1345 <= 0 (expected engagement 0.7%, unsubscribe risk 1.42%; "
        "2 messages in the last 7 days)."
    )


class ArmValues:
    """Values each variant at its expected value ``means[arm]``, ranks by ``draws[arm]``, and marks an
    option explored as the learners do (its expected value below the campaign's best); ``forced``
    holds back every other variant, as the learners' minimum exploration share does."""

    def __init__(self, means: dict[str, float], draws: dict[str, float], forced: str | None = None) -> None:
        self.means, self.draws, self.forced = means, draws, forced

    def score(
        self, *, profile: Any, candidates: Sequence[Candidate], now_ms: int, seed: int
    ) -> list[Candidate]:
        late = [(c.send_at_ms - now_ms) / DAY_MS / 100 for c in candidates]  # earlier times a little better
        means = [self.means[str(c.arm)] - x for c, x in zip(candidates, late, strict=True)]
        draws = [self.draws[str(c.arm)] - x for c, x in zip(candidates, late, strict=True)]
        best = max(means)
        return [
            replace(
                c,
                score=-math.inf if self.forced not in (None, c.arm) else draw,
                engagement=mean * 3,
                draw=draw,
                mean=mean,
                explored=mean < best - 1e-12 or c.arm == self.forced,
            )
            for c, mean, draw in zip(candidates, means, draws, strict=True)
        ]


def test_the_variant_note_says_truthfully_whether_the_variant_was_explored_and_which_is_best() -> None:
    """An outside check read "variant 'b' explored ...; best variant 'b' ..." where the chosen variant
    was the best (the exploration was in its time), and "variant 'b' exploited; best variant 'a' by
    0.0000" where two variants were valued alike."""
    arms = (SplitArm("a", 0.5, "t_a"), SplitArm("b", 0.5, "t_b"))
    learned = rules(camp("s", split=arms, learn_variants=True))

    def note(scorer: ArmValues) -> tuple[Decision, list[str]]:
        d = run(learned, MemoryProfile(customer_id=1, timezone="UTC"), scorer=scorer)
        assert d.action == "send"
        return d, list(d.notes)

    # b is the best variant and drawn best: exploited, whichever time
    d, notes = note(ArmValues({"a": 0.0126, "b": 0.02}, {"a": 0.01, "b": 0.03}))
    assert d.arm == "b" and notes == [
        "variant 'b' exploited: the best variant, 0.0074 above 'a' in expected value "
        "(expected engagement 6.0% vs 3.8%)"
    ]
    # a is better, b drawn: b explored by the draw
    d, notes = note(ArmValues({"a": 0.02, "b": 0.0126}, {"a": 0.01, "b": 0.03}))
    assert d.arm == "b" and notes == [
        "variant 'b' explored (the posterior draw favoured it); best variant 'a', 0.0074 above 'b' "
        "in expected value (expected engagement 6.0% vs 3.8%)"
    ]
    # alike: the draw chose between them, neither "explored" nor a "best variant 'a' by 0.0000"
    d, notes = note(ArmValues({"a": 0.02, "b": 0.02}, {"a": 0.01, "b": 0.03}))
    assert d.arm == "b" and notes == [
        "variant 'b' exploited: valued alike with 'a' (expected value 0.0200, expected engagement 6.0%); "
        "this decision's posterior draw chose"
    ]
    # the minimum exploration share forced b, also the best one
    d, notes = note(ArmValues({"a": 0.0126, "b": 0.02}, {"a": 0.03, "b": 0.01}, forced="b"))
    assert d.arm == "b" and notes == [
        "variant 'b' explored (minimum exploration share), the best variant too: 0.0074 above 'a' "
        "in expected value (expected engagement 6.0% vs 3.8%)"
    ]


def test_a_best_variant_sent_at_an_explored_time_says_the_time_was_explored() -> None:
    """b is the best variant, but the draw chose a later time than its best: the variant was not
    explored, the time was."""

    class LateDraw(ArmValues):
        def score(
            self, *, profile: Any, candidates: Sequence[Candidate], now_ms: int, seed: int
        ) -> list[Candidate]:
            return [
                replace(c, score=c.draw + (c.send_at_ms - now_ms) / DAY_MS if c.draw is not None else c.score)
                for c in super().score(profile=profile, candidates=candidates, now_ms=now_ms, seed=seed)
            ]

    arms = (SplitArm("a", 0.5, "t_a"), SplitArm("b", 0.5, "t_b"))
    d = run(
        rules(camp("s", split=arms, learn_variants=True)),
        MemoryProfile(customer_id=1, timezone="UTC"),
        scorer=LateDraw({"a": 0.0126, "b": 0.02}, {"a": 0.01, "b": 0.03}),
    )
    assert d.arm == "b" and d.send_at_ms > NOW
    assert d.notes[0].startswith("variant 'b' exploited: the best variant, ")
    assert (
        d.notes[1]
        == "send time/channel chosen by exploration: the posterior draw favoured a less-known option"
    )


def test_split_arms_choose_template_and_learn_variants_offer_each_variant() -> None:
    arms = (SplitArm("hold", 0.1, holdout=True), SplitArm("a", 0.45, "t_a"), SplitArm("b", 0.45, "t_b"))
    templates = {run(rules(camp("s", split=arms)), MemoryProfile(customer_id=i)).template for i in range(200)}
    assert templates == {"t_a", "t_b", None}
    learned = camp("s", split=arms, learn_variants=True)
    profile = next(MemoryProfile(customer_id=i) for i in range(100) if stable_share(i, "s") >= 0.1)
    d = run(rules(learned), profile, scorer=RandomScorer())
    assert {c.arm for c in d.candidates} == {"a", "b"}
    assert d.template in {"t_a", "t_b"} and d.arm in {"a", "b"}


# -- properties -------------------------------------------------------------------------------------

ZONES = [
    "Europe/Berlin",
    "America/New_York",
    "Australia/Sydney",
    "Asia/Kolkata",
    "UTC",
    None,
    # Lord Howe moves its clocks by half an hour; Santiago at local midnight, so the day it
    # springs forward has no 00:00 and a calendar day starts at 01:00.
    "Australia/Lord_Howe",
    "America/Santiago",
]
# Around the 2026 DST changes in Europe, the US, Australia (Lord Howe on the same days as Sydney)
# and Chile (2026-04-05 back, 2026-09-06 forward).
DST_DAYS = [
    ms("2026-03-08T00:00"),
    ms("2026-03-29T00:00"),
    ms("2026-04-04T12:00"),
    ms("2026-04-05T00:00"),
    ms("2026-09-05T12:00"),
    ms("2026-10-03T12:00"),
    ms("2026-10-25T00:00"),
    ms("2026-11-01T00:00"),
]

caps_st = st.builds(
    Cap,
    count=st.integers(1, 3),
    window_ms=st.sampled_from([HOUR_MS, 6 * HOUR_MS, DAY_MS, 2 * DAY_MS, 7 * DAY_MS]),
    scope=st.sampled_from(["campaign", "channel", "customer", "group"]),
    channel=st.sampled_from([None, "email", "sms"]),
    calendar=st.booleans(),
)


def _peak_violated(times: list[int], t: int, width: int, limit: int) -> bool:
    """Independent check: some run of sends spanning < width and containing t exceeds limit."""
    pts = sorted(times + [t])
    for i in range(len(pts)):
        for j in range(i, len(pts)):
            if pts[j] - pts[i] < width and pts[i] <= t <= pts[j] and j - i + 1 > limit:
                return True
    return False


@settings(max_examples=150, deadline=None)
@given(
    campaign_caps=st.lists(caps_st, max_size=2),
    global_caps=st.lists(caps_st, max_size=2),
    offsets=st.lists(st.integers(-10 * DAY_MS, 2 * DAY_MS), max_size=8),
    sent_campaigns=st.lists(st.sampled_from(["c", "other"]), min_size=8, max_size=8),
    sent_channels=st.lists(st.sampled_from(["email", "sms"]), min_size=8, max_size=8),
    zone=st.sampled_from(ZONES),
    day=st.sampled_from(DST_DAYS),
    hour=st.integers(0, 47),
    scored=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_no_decision_breaks_a_cap(
    campaign_caps: list[Cap],
    global_caps: list[Cap],
    offsets: list[int],
    sent_campaigns: list[str],
    sent_channels: list[str],
    zone: str | None,
    day: int,
    hour: int,
    scored: bool,
    seed: int,
) -> None:
    now = day + hour * HOUR_MS
    c = camp(
        "c", caps=tuple(campaign_caps), exclusive="g", channels=ChannelPolicy(("email", "sms"), mode="best")
    )
    history = [
        PastSend(ts_ms=now + off, campaign=cn, channel=ch, exclusive="g" if cn == "c" else None)
        for off, cn, ch in zip(offsets, sent_campaigns, sent_channels, strict=False)
    ]
    profile = MemoryProfile(customer_id=seed, timezone=zone)
    d = run(
        rules(c, caps=tuple(global_caps), default_zone="Europe/Berlin"),
        profile,
        now_ms=now,
        history=history,
        scorer=RandomScorer() if scored else None,
        seed=seed,
    )
    if d.action != "send":
        assert d.suppressions
        return
    assert d.send_at_ms is not None and d.channel is not None
    t = d.send_at_ms
    tz = ZoneInfo(zone or "Europe/Berlin")
    for cap in (*campaign_caps, *global_caps):
        if cap.channel is not None and cap.channel != d.channel:
            continue
        counted = [
            h.ts_ms
            for h in history
            if (cap.scope == "customer")
            or (cap.scope == "channel" and h.channel == d.channel)
            or (cap.scope == "group" and h.exclusive == "g")
            or (
                cap.scope == "campaign"
                and h.campaign == "c"
                and (cap.channel is None or h.channel == d.channel)
            )
        ]
        if cap.calendar:
            days = max(1, cap.window_ms // DAY_MS)
            assert not _peak_violated(
                [local_day(x, tz) for x in counted], local_day(t, tz), days, cap.count
            ), cap
        else:
            assert not _peak_violated(counted, t, cap.window_ms, cap.count), cap


def _first_allowed_by_minute(quiet: QuietHours, now: int, tz: ZoneInfo) -> int | None:
    """Independent oracle: ``now`` when its wall clock is allowed, else the first whole minute after it
    that is (quiet ends and every zone's changes of offset fall on whole minutes), in real order."""
    if not is_quiet(quiet, local_datetime(now, tz).time()):
        return now
    t = (now // 60_000 + 1) * 60_000
    for _ in range(2 * 24 * 60):
        if not is_quiet(quiet, local_datetime(t, tz).time()):
            return t
        t += 60_000
    return None


def _decide_in_quiet_hours(quiet: QuietHours, zone: str | None, now: int, scored: bool, seed: int) -> None:
    """Decide for a customer in ``zone`` (None: the campaign's fallback) at ``now`` and check the answer."""
    d = run(
        rules(camp("q", quiet=quiet)),
        MemoryProfile(customer_id=seed, timezone=zone),
        now_ms=now,
        scorer=RandomScorer() if scored else None,
        seed=seed,
    )
    _check_quiet_decision(d, quiet, ZoneInfo(zone or quiet.fallback_zone), now, scored)


def _check_quiet_decision(d: Decision, quiet: QuietHours, tz: ZoneInfo, now: int, scored: bool) -> None:
    """No send inside quiet hours, none before its decision; unscored, exactly the first allowed instant."""
    local_now = local_datetime(now, tz)
    if d.action == "send":
        assert d.send_at_ms is not None and d.send_at_ms >= now, (local_now, quiet)
        local = local_datetime(d.send_at_ms, tz)
        assert not is_quiet(quiet, local.time()), (local, quiet)
        if not scored:
            assert d.send_at_ms == _first_allowed_by_minute(quiet, now, tz), (local_now, local, quiet)
    else:
        assert is_quiet(quiet, local_now.time()) and d.suppressed("q", "quiet")
        assert quiet.action == "drop" or quiet.whole_day, (local_now, quiet)


@settings(max_examples=150, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    day=st.sampled_from(DST_DAYS),
    minute=st.integers(0, 48 * 60),
    start=st.integers(0, 23),
    end=st.integers(0, 23),
    start_minute=st.sampled_from([0, 10, 30, 45]),
    end_minute=st.sampled_from([0, 10, 30, 45]),
    action=st.sampled_from(["defer", "drop"]),
    scored=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_no_send_inside_quiet_hours_across_dst(
    zone: str | None,
    day: int,
    minute: int,
    start: int,
    end: int,
    start_minute: int,
    end_minute: int,
    action: str,
    scored: bool,
    seed: int,
) -> None:
    quiet = QuietHours(
        start=time(start, start_minute),
        end=time(end, end_minute),
        fallback_zone="America/New_York",
        action=action,
    )  # type: ignore[arg-type]
    _decide_in_quiet_hours(quiet, zone, day + minute * 60_000, scored, seed)


#: Zones and a UTC instant before their 2026 fall-back change (Lord Howe's is half an hour;
#: Santiago's repeats 23:00-23:59; St John's is 3:30 behind UTC in winter).
FALL_BACKS = [
    ("Europe/Berlin", ms("2026-10-25T00:00")),
    ("America/New_York", ms("2026-11-01T00:00")),
    ("America/St_Johns", ms("2026-11-01T00:00")),
    ("Australia/Sydney", ms("2026-04-04T00:00")),
    ("Australia/Lord_Howe", ms("2026-04-04T00:00")),
    ("America/Santiago", ms("2026-04-04T12:00")),
]


def _fall_back(zone: str, after: int) -> tuple[int, time, int]:
    """(the change, the first repeated wall-clock time, minutes repeated), found minute by minute."""
    tz = ZoneInfo(zone)
    t = after
    while local_datetime(t + 60_000, tz).utcoffset() == local_datetime(t, tz).utcoffset():
        t += 60_000
    change = t + 60_000
    before, after_change = local_datetime(t, tz).utcoffset(), local_datetime(change, tz).utcoffset()
    assert before is not None and after_change is not None and after_change < before
    return change, local_datetime(change, tz).time(), int((before - after_change).total_seconds()) // 60


@settings(max_examples=120, deadline=None)
@given(
    place=st.sampled_from(FALL_BACKS),
    end_into=st.floats(0, 1, exclude_max=True),
    start=st.integers(0, 24 * 60 - 1),
    around=st.integers(-100 * 60, 100 * 60),
    action=st.sampled_from(["defer", "drop"]),
    scored=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_quiet_hours_ending_in_a_repeated_hour_defer_forward_in_real_time(
    place: tuple[str, int], end_into: float, start: int, around: int, action: str, scored: bool, seed: int
) -> None:
    """A quiet range that ends inside the hour a fall-back night passes twice, decided around the change
    (seconds apart): the send is the first allowed instant in real order, never before the decision. Until
    session 24 a time in the second pass deferred to the end's *first* pass (outside checker, D1)."""
    zone, after = place
    change, repeated, minutes = _fall_back(zone, after)
    end_minute = repeated.hour * 60 + repeated.minute + int(end_into * minutes)
    quiet = QuietHours(
        start=time(start // 60, start % 60),
        end=time(end_minute // 60, end_minute % 60),
        fallback_zone="UTC",
        action=action,
    )  # type: ignore[arg-type]
    _decide_in_quiet_hours(quiet, zone, change + around * 1000, scored, seed)


@settings(max_examples=60, deadline=None)
@given(share=st.floats(0.05, 0.5), customer=st.integers(0, 10**9), scored=st.booleans())
def test_holdout_never_receives_and_is_recorded(share: float, customer: int, scored: bool) -> None:
    arms = (SplitArm("holdout", share, holdout=True), SplitArm("rest", 1 - share))
    d = run(
        rules(camp("h", split=arms), camp("other", priority=0)),
        MemoryProfile(customer_id=customer),
        scorer=RandomScorer() if scored else None,
    )
    held = stable_share(customer, "h") < share
    assert ("h" in d.holdout) == held
    if held:
        assert d.campaign != "h" and d.suppressed("h", "holdout")
    else:
        assert d.campaign == "h"


def test_holdout_share_is_close_to_configured() -> None:
    arms = (SplitArm("holdout", 0.2, holdout=True), SplitArm("rest", 0.8))
    r = rules(camp("h", split=arms))
    held = sum("h" in run(r, MemoryProfile(customer_id=i)).holdout for i in range(4000))
    assert 0.17 < held / 4000 < 0.23


@settings(max_examples=150, deadline=None)
@given(
    consent=st.dictionaries(st.sampled_from(["email", "sms", "push", "all"]), st.booleans()),
    bounced=st.lists(st.sampled_from(["email", "sms", "push"]), unique=True),
    order=st.permutations(["email", "sms", "push"]),
    mode=st.sampled_from(["best", "ordered"]),
    offered=st.sets(st.sampled_from(["email", "sms", "push"])),
    scored=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_opted_out_bounced_and_unoffered_channels_are_never_chosen(
    consent: dict[str, bool],
    bounced: list[str],
    order: list[str],
    mode: str,
    offered: set[str],
    scored: bool,
    seed: int,
) -> None:
    profile = MemoryProfile(customer_id=seed, consent=dict(consent), traits={"bounced": bounced})
    c = camp("c", channels=ChannelPolicy(tuple(order), mode=mode))  # type: ignore[arg-type]
    d = run(
        rules(c), profile, available_channels=offered, scorer=RandomScorer() if scored else None, seed=seed
    )
    ok = [ch for ch in order if ch in offered and consent.get(ch) is not False and ch not in bounced]
    if consent.get("all") is False:
        ok = []
    if not ok:
        assert d.action == "none"
        return
    assert d.channel in ok
    if mode == "ordered":
        assert d.channel == ok[0]
