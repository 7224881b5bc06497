"""The learners' best_options: each group's best send time, the same as picking it from score_options."""

from __future__ import annotations

import random

import pytest

from cadence.channels import Feedback
from cadence.engine.campaign import DAY_MS, HOUR_MS, Campaign, ChannelPolicy, TemplateSpec
from cadence.engine.decide import OptionGroup, group_bests
from cadence.engine.learners import DecisionLearner, LearnerConfig
from cadence.engine.profiles_memory import MemoryProfile

NOW = 1_780_000_000_000
CHANNELS = ("email", "sms", "push", "webhook")
TRAITS = {"plan": "pro", "age_band": "35+"}


def _campaign(name: str) -> Campaign:
    return Campaign(
        name=name,
        title=name,
        priority=0,
        audience=None,
        template=TemplateSpec("t"),
        channels=ChannelPolicy(CHANNELS, mode="best"),
    )


def _trained(config: LearnerConfig, labels: int) -> DecisionLearner:
    """A learner that has seen ``labels`` labelled sends (clicks at some hours, a few unsubscribes)."""
    learner = DecisionLearner(config)
    rng = random.Random(5)
    for i in range(labels):
        t = NOW - 20 * DAY_MS + i * 700_000
        did = f"d{i}"
        learner.record_decision(
            decision_id=did,
            customer_id=rng.randrange(1, 60),
            traits=TRAITS,
            zone="America/New_York",
            campaign=f"c{rng.randrange(5)}",
            channel=rng.choice(CHANNELS),
            send_at_ms=t,
            arm=None,
            now_ms=t,
        )
        learner.observe(decision_id=did, kind=Feedback.DELIVERED, ts_ms=t)
        if rng.random() < 0.25:
            learner.observe(decision_id=did, kind=Feedback.CLICKED, ts_ms=t + 60_000, zone="America/New_York")
        elif rng.random() < 0.02:
            learner.observe(decision_id=did, kind=Feedback.UNSUBSCRIBED, ts_ms=t + 60_000)
    learner.advance(NOW)
    return learner


@pytest.mark.parametrize(
    "config",
    [
        LearnerConfig(),
        LearnerConfig(explore_volume=True, unsubscribe_cost=25.0),
        LearnerConfig(click_value=2.0, beta=0.8),
        LearnerConfig(volume_optimism=0.25, explore_unsubscribe=True),
        LearnerConfig(hazard_fit=True),
    ],
    ids=["default", "explore-volume", "value-beta", "optimism", "fitted-hazard"],
)
@pytest.mark.parametrize("labels", [0, 600])
def test_best_options_picks_what_score_options_values_highest(config: LearnerConfig, labels: int) -> None:
    learner = _trained(config, labels)
    groups = []
    for c in range(5):
        camp = _campaign(f"c{c}")
        groups += [OptionGroup(camp, ch, None, ()) for ch in CHANNELS]
    chosen: set[int] = set()
    for i in range(40):
        now = NOW + i * 5_100_000
        times = [now, *((now // HOUR_MS + 1 + k) * HOUR_MS for k in range(23))]
        shaped = [g._replace(times=times) for g in groups]
        profile = MemoryProfile(customer_id=1 + i % 7, timezone="America/New_York", traits=TRAITS)
        full = group_bests(
            learner.score_options(profile=profile, groups=shaped, now_ms=now, seed=i), len(shaped)
        )
        got = learner.best_options(profile=profile, groups=shaped, now_ms=now, seed=i)
        assert got == full
        chosen.update(got[0])
    assert len(chosen) > 1  # the best time is not always the first: the draw and the hours matter
