"""What a person reads of a decision: the summary and the conditions, from rule files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from zoneinfo import ZoneInfo

from cadence.dsl.explain import explain_campaign
from cadence.dsl.loader import load_source
from cadence.engine.campaign import CompiledRuleset
from cadence.engine.decide import decide
from cadence.engine.decision import Candidate, Decision
from cadence.engine.decisions_service import explain
from cadence.engine.explanation import summarise
from cadence.engine.profiles_memory import MemoryProfile, ProfileEvent

RULES = """\
event purchased = "Order Completed"
segment pros = customer.plan ?? "free" == "pro"

campaign nightly "Late offer, never at night" {
    send      template "offer"
    channel   sms, fallback email
    quiet     21:00..08:00 in customer.timezone ?? "Europe/Berlin" then drop
    priority  5
}

campaign later "Deferred to the morning" {
    send      template "later"
    channel   email
    quiet     21:00..08:00 in customer.timezone ?? "Europe/Berlin" then defer
    priority  1
}

campaign news "News, unless they just bought" {
    audience  pros
    unless    purchased within 2d
    send      template "news"
    channel   email
    priority  3
}
"""

BERLIN = ZoneInfo("Europe/Berlin")
NIGHT = int(datetime(2026, 3, 4, 22, 30, tzinfo=BERLIN).timestamp() * 1000)  # 22:30 in Berlin


def ruleset() -> CompiledRuleset:
    loaded = load_source(RULES)
    assert not loaded.errors, loaded.errors
    return loaded.ruleset


def decided(profile: MemoryProfile, *campaigns: str, now_ms: int = NIGHT) -> Decision:
    return decide(
        ruleset=ruleset(),
        profile=profile,
        now_ms=now_ms,
        history=[],
        available_channels=["email", "sms"],
        campaigns=campaigns or None,
    )


def test_a_quiet_hours_drop_is_said_even_when_another_reason_held_one_of_the_channels() -> None:
    """The sms opt-out held one channel; the drop at 22:30 took the campaign's last one: both are
    in the summary (the drop used to hide behind the opt-out, the one reason named)."""
    profile = MemoryProfile(customer_id=1, timezone="Europe/Berlin", consent={"sms": False})
    d = decided(profile, "nightly")
    assert d.action == "none"
    said = summarise(d, zone="Europe/Berlin")
    assert said == (
        "Nothing to send. nightly: opted out of sms; "
        "nightly: 2026-03-04 22:30 CET is inside quiet hours 21:00..08:00 Europe/Berlin: dropped."
    )
    # Beside a send, too: the deferred campaign goes at 08:00, the dropped one is named.
    d = decided(profile, "nightly", "later")
    assert (d.action, d.campaign) == ("send", "later")
    said = summarise(d, zone="Europe/Berlin")
    assert "(deferred out of quiet hours)" in said
    assert said.endswith(
        "Not chosen: nightly (opted out of sms); "
        "nightly (2026-03-04 22:30 CET is inside quiet hours 21:00..08:00 Europe/Berlin: dropped)."
    )


def test_a_deferral_is_still_left_out_when_something_else_held_the_campaign() -> None:
    """A deferral out of quiet hours is not why a campaign lost: priority is said, the deferral not."""
    profile = MemoryProfile(customer_id=1, timezone="Europe/Berlin", traits={"plan": "pro"})
    d = decided(profile, "news", "later")
    assert (d.action, d.campaign) == ("send", "news")
    said = summarise(d, zone="Europe/Berlin")
    assert "later (news has priority 3 > 1)" in said and "deferred to" not in said


def test_an_unless_that_does_not_hold_reads_as_passed_with_its_value() -> None:
    """``unless purchased within 2d`` with no purchase let ``news`` through: passed, value false;
    with a purchase it held the campaign back: not passed, value true. The audience reads as
    before, and each part says its clause (a segment named as the audience too)."""
    pro = MemoryProfile(customer_id=1, timezone="Europe/Berlin", traits={"plan": "pro"})
    d = decided(pro, "news")
    assert (d.action, d.campaign) == ("send", "news")
    conditions = explain(d, zone="Europe/Berlin", fallback_zone="UTC")["conditions"]["news"]
    assert conditions == [
        {"text": 'customer.plan ?? "free" == "pro"', "value": "pro", "passed": True, "stage": "audience"},
        {"text": "purchased within 2d", "value": False, "passed": True, "stage": "unless"},
    ]

    bought = MemoryProfile(
        customer_id=2,
        timezone="Europe/Berlin",
        traits={"plan": "pro"},
        events=[ProfileEvent("Order Completed", NIGHT - 3_600_000, {"revenue": 80.0})],
    )
    d = decided(bought, "news")
    assert d.action == "none" and d.suppressed("news", "unless")
    [audience, unless] = explain(d, zone="Europe/Berlin", fallback_zone="UTC")["conditions"]["news"]
    assert (unless["value"], unless["passed"], unless["stage"]) == (True, False, "unless")
    assert audience["passed"] is True
    # ``cadence explain`` reads the unless the same way.
    record = explain_campaign(
        ruleset=ruleset(), campaign="news", profile=pro, now_ms=NIGHT, available_channels=["email"]
    )
    assert [(c["stage"], c["value"], c["passed"]) for c in record["checks"]] == [
        ("audience", "pro", True),
        ("unless", False, True),
    ]


def test_the_summary_of_a_split_send_speaks_of_the_arm_sent() -> None:
    """The arms of a learned split share campaign, channel and time: the summary takes the chosen arm's numbers."""
    from cadence.engine.decision import Candidate

    at = int(datetime(2026, 3, 2, 10, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    arms = [
        Candidate("alpha", "email", at, 0.05, engagement=0.058, unsubscribe=0.001, explored=True, arm="x"),
        Candidate("alpha", "email", at, 0.06, engagement=0.059, unsubscribe=0.001, arm="y"),
    ]
    sent = Decision(
        action="send", ruleset_hash="h", customer_id=1, decided_at_ms=at, campaign="alpha", channel="email",
        send_at_ms=at, template="alpha_y", arm="y", candidates=arms,
    )  # fmt: skip
    said = summarise(sent, zone="UTC")
    assert "expected engagement 5.9%" in said and "exploratory" not in said, said


def test_a_next_best_option_on_another_day_is_said_with_its_day() -> None:
    from cadence.engine.decision import Candidate

    at = int(datetime(2026, 3, 2, 10, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    later = int(datetime(2026, 3, 3, 7, 45, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    options = [
        Candidate("alpha", "email", at, 0.06, engagement=0.06, unsubscribe=0.001),
        Candidate("alpha", "sms", later, 0.04, engagement=0.04, unsubscribe=0.001),
        Candidate("alpha", "push", at + 3_600_000, 0.03, engagement=0.03, unsubscribe=0.001),
    ]
    sent = Decision(
        action="send", ruleset_hash="h", customer_id=1, decided_at_ms=at, campaign="alpha", channel="email",
        send_at_ms=at, candidates=options,
    )  # fmt: skip
    assert "next best sms at Tue 03 Mar 07:45 (4.0%" in summarise(sent, zone="UTC")
    sooner = Decision(**{**sent.__dict__, "candidates": [options[0], options[2]]})
    assert "next best push at 11:00 (3.0%" in summarise(sooner, zone="UTC")


class ByCampaign:
    """Values every option of a campaign alike: ``values[campaign]``."""

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    def score(
        self, *, profile: object, candidates: Sequence[Candidate], now_ms: int, seed: int
    ) -> list[Candidate]:
        return [replace(c, score=self.values[c.campaign] - c.send_at_ms / 1e18) for c in candidates]


def test_the_chosen_option_is_listed_first_then_the_rest_by_score() -> None:
    """news wins on priority (3 > 1) with a lower score than later's: a reader takes the first row
    for the choice, so it comes first (an outside check found the chosen option below another in
    55 of 327 sends), then the rest best first."""
    profile = MemoryProfile(customer_id=1, timezone="Europe/Berlin", traits={"plan": "pro"})
    d = decide(
        ruleset=ruleset(),
        profile=profile,
        now_ms=NIGHT + 12 * 3_600_000,
        history=[],
        available_channels=["email", "sms"],
        campaigns=["news", "later"],
        scorer=ByCampaign({"news": 0.01, "later": 0.2}),
    )
    assert (d.action, d.campaign) == ("send", "news")
    listed = explain(d, zone="Europe/Berlin", fallback_zone="UTC")["candidates"]
    assert (listed[0]["campaign"], listed[0]["send_at"]) == ("news", "2026-03-05T10:30:00+01:00")
    rest = [c["score"] for c in listed[1:]]
    assert rest == sorted(rest, reverse=True) and rest[0] > listed[0]["score"]


class Engaging:
    """Values every option of a campaign alike, its expected engagement the value: ``values[campaign]``."""

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    def score(
        self, *, profile: object, candidates: Sequence[Candidate], now_ms: int, seed: int
    ) -> list[Candidate]:
        return [
            replace(c, score=self.values[c.campaign], engagement=self.values[c.campaign], unsubscribe=0.002)
            for c in candidates
        ]


OUTRANKED = """\
campaign vip "VIP" {
    send      template "vip"
    channel   email
    priority  5
    exclusive "offers"
}

campaign promo "Promo" {
    send      template "promo"
    channel   sms
    priority  3
    exclusive "%s"
}

campaign news "News" {
    send      template "news"
    channel   sms
    priority  1
}
"""


def test_a_runner_up_that_engages_more_says_what_out_ranked_it() -> None:
    """An outside check read "next best promo by push at 10:00 (6.9%)" beside a chosen vip at 6.4% as
    a worse choice: the runner-up says what decided (priority, or the exclusive group), and that reason
    is not said again under "Not chosen" (another campaign it held still is)."""
    profile = MemoryProfile(customer_id=1, timezone="Europe/Berlin")
    scorer = Engaging({"vip": 0.064, "promo": 0.069, "news": 0.05})
    for group, why in (("others", "vip has priority 5 > 3"), ("offers", "vip won exclusive group 'offers'")):
        loaded = load_source(OUTRANKED % group)
        assert not loaded.errors, loaded.errors
        d = decide(
            ruleset=loaded.ruleset,
            profile=profile,
            now_ms=NIGHT,
            history=[],
            available_channels=["email", "sms"],
            scorer=scorer,
        )
        assert (d.action, d.campaign) == ("send", "vip")
        said = summarise(d, zone="Europe/Berlin")
        assert f"next best promo by sms at 22:30 (6.9%, out-ranked: {why})." in said, said
        assert said.endswith(" Not chosen: news (vip has priority 5 > 1)."), said


def test_another_campaign_on_the_chosen_channel_can_be_the_runner_up() -> None:
    """ "Next best" looked only at other channels: a campaign on the chosen channel that engages more
    and lost on priority was never named beside the send."""
    profile = MemoryProfile(customer_id=1, timezone="Europe/Berlin")
    scorer = Engaging({"vip": 0.064, "promo": 0.069, "news": 0.05})
    loaded = load_source(
        (OUTRANKED % "others").replace("channel   sms\n    priority  3", "channel   email\n    priority  3")
    )
    assert not loaded.errors, loaded.errors
    d = decide(
        ruleset=loaded.ruleset,
        profile=profile,
        now_ms=NIGHT,
        history=[],
        available_channels=["email", "sms"],
        scorer=scorer,
    )
    assert (d.action, d.campaign, d.channel) == ("send", "vip", "email")
    said = summarise(d, zone="Europe/Berlin")
    assert "next best promo by email at 22:30 (6.9%, out-ranked: vip has priority 5 > 3)." in said, said
