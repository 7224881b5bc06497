"""How much to send: the unsubscribe risk a send carries, by recent load and by how well its hour fits."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from datetime import UTC, datetime, time

import pytest

from cadence.channels import Feedback
from cadence.engine.campaign import (
    HOUR_MS,
    Campaign,
    ChannelPolicy,
    CompiledRuleset,
    GlobalSettings,
    QuietHours,
    TemplateSpec,
)
from cadence.engine.decide import OptionGroup, decide
from cadence.engine.learners import DecisionLearner, FatigueHazard, FittedHazard, LearnerConfig
from cadence.engine.profiles_memory import MemoryProfile

NOW = int(datetime(2026, 5, 4, 6, tzinfo=UTC).timestamp() * 1000)
DAY = 24 * HOUR_MS


def _rules() -> CompiledRuleset:
    camp = Campaign(
        name="promo",
        title="promo",
        priority=1,
        audience=None,
        template=TemplateSpec("t"),
        channels=ChannelPolicy(("email",), mode="best"),
        quiet=QuietHours(start=time(21), end=time(8), fallback_zone="UTC"),
    )
    return CompiledRuleset(
        hash="h", campaigns={"promo": camp}, segments={}, settings=GlobalSettings(), aggregates=frozenset()
    )


def test_a_load_never_seen_borrows_the_slope_learned_at_the_loads_seen() -> None:
    """Sends only at loads 0-3: the fitted hazard's risk at load 6 follows the slope; separate cells keep their prior."""
    truth = [0.004 * (1 + 0.6 * k) for k in range(8)]
    err_cells = err_fit = 0.0
    for seed in range(6):
        rng = random.Random(seed)
        cells = FatigueHazard(prior=0.002, strength=300, slope=0.3)
        fitted = FittedHazard(prior=0.002, strength=300, slope=0.3)
        for _ in range(6000):
            k = rng.randrange(4)
            unsub = rng.random() < truth[k]
            cells.learn(0, k, unsub)
            fitted.learn(0, k, unsub)
        err_cells += abs(math.log(cells.rates()[0, 6] / truth[6]))
        err_fit += abs(math.log(fitted.rates()[0, 6] / truth[6]))
    assert err_fit < 0.6 * err_cells, (err_fit, err_cells)


def test_a_jump_in_risk_at_high_load_still_shows() -> None:
    """Unsubscribes only at load 6: the straight line cannot follow, the cell shrunk towards it does."""
    h = FittedHazard(prior=0.002, strength=300, slope=0.3)
    for _ in range(400):
        for k in range(7):
            h.learn(0, k, False)
    for _ in range(40):
        h.learn(0, 6, True)
    assert h.rates()[0, 6] > 0.05 and h.rates()[0, 0] < 0.01, h.rates()[0]


@pytest.mark.parametrize("fit", [True, False])
def test_sends_at_badly_fitting_hours_carry_more_risk_once_they_are_seen_to(fit: bool) -> None:
    """Customers click at 10:00 and unsubscribe from sends at 18:00: a newcomer's 18:00 send is riskier.

    Without the fitted hazard (``hazard_fit=False``) the risk is the same at every hour.
    (An unsubscribe here does not stop the sends: the test only counts them.)
    """
    learner = DecisionLearner(LearnerConfig(hazard_fit=fit))
    rng = random.Random(5)
    for day in range(10):
        for c in range(200):
            hour = 10 if (c + day) % 2 else 18
            at = NOW + day * DAY + (hour - 6) * HOUR_MS
            did = f"{c}:{day}"
            learner.record_decision(
                decision_id=did,
                customer_id=c,
                traits={},
                zone="UTC",
                campaign="promo",
                channel="email",
                send_at_ms=at,
                arm=None,
                now_ms=at - HOUR_MS,
            )
            learner.observe(decision_id=did, kind=Feedback.DELIVERED, ts_ms=at)
            if hour == 10 and rng.random() < 0.3:
                learner.observe(decision_id=did, kind=Feedback.CLICKED, ts_ms=at + 60_000)
            if rng.random() < (0.003 if hour == 10 else 0.03):
                learner.observe(decision_id=did, kind=Feedback.UNSUBSCRIBED, ts_ms=at + 120_000)
        learner.advance(NOW + (day + 1) * DAY)
    learner.advance(NOW + 20 * DAY)
    day20 = NOW + 20 * DAY
    times = (day20 + 4 * HOUR_MS, day20 + 12 * HOUR_MS)  # 10:00 and 18:00 UTC
    res = learner.score_options(
        profile=MemoryProfile(customer_id=10_000, timezone="UTC"),
        groups=[OptionGroup(_rules().campaigns["promo"], "email", None, times)],
        now_ms=day20 + HOUR_MS,
        seed=1,
    )
    risk = {10: float(res.unsubscribe[0]), 18: float(res.unsubscribe[1])}
    if fit:
        assert risk[18] > 1.5 * risk[10], risk
    else:
        assert risk[18] == risk[10], risk


def _decide(learner: DecisionLearner, customer: int = 1) -> tuple[str, float]:
    d = decide(
        ruleset=_rules(),
        profile=MemoryProfile(customer_id=customer, timezone="UTC"),
        now_ms=NOW,
        history=[],
        available_channels={"email"},
        scorer=learner,
        seed=3,
    )
    return d.action, max(c.engagement for c in d.candidates)


def test_volume_optimism_sends_to_an_uncertain_customer_the_posterior_mean_would_leave_alone() -> None:
    """The unsubscribe cost is set just above what the mean engagement is worth; one sd of hope sends."""
    _, p_mean = _decide(DecisionLearner())
    cost = 1.2 * p_mean / 0.002  # the value at the posterior mean: p_mean - 1.2 p_mean < 0
    cautious = DecisionLearner(LearnerConfig(unsubscribe_cost=cost))
    hopeful = DecisionLearner(LearnerConfig(unsubscribe_cost=cost, volume_optimism=1.0))
    assert _decide(cautious)[0] == "none"
    action, p = _decide(hopeful)
    assert action == "send"
    assert p == pytest.approx(p_mean)  # what is reported and learned is still the posterior mean


def test_the_fitted_hazard_survives_a_snapshot() -> None:
    """A learner snapshot (pickle, as the engine loop stores it) keeps the fitted hazard's counts and fit."""
    import pickle

    learner = DecisionLearner(LearnerConfig(hazard_fit=True))
    rng = random.Random(2)
    for _ in range(3000):
        learner.hazard.learn(rng.randrange(3), rng.randrange(8), rng.random() < 0.02, rng.uniform(-0.8, 0.8))
    before = learner.hazard.rates().copy()
    restored = pickle.loads(pickle.dumps(learner))
    assert isinstance(restored.hazard, FittedHazard)
    assert (restored.hazard.rates() == before).all()
    assert restored.hazard.g == learner.hazard.g


@pytest.mark.parametrize("kind", [FatigueHazard, FittedHazard])
def test_a_late_unsubscribe_counts_as_if_it_had_been_known_at_once(kind: type[FatigueHazard]) -> None:
    # With provisional labels (label_delay_ms) a send is first learned as kept; an unsubscribe
    # arriving later must leave the hazard's counts where learning it at once would have.
    at_once, late = kind(prior=0.002, strength=100, slope=0.3), kind(prior=0.002, strength=100, slope=0.3)
    for h in (at_once, late):
        for load in range(8):
            for _ in range(50):
                h.learn(1, load, False, fit=0.2)
    at_once.learn(1, 4, True, fit=-0.5)
    late.learn(1, 4, False, fit=-0.5)
    late.late_unsubscribe(1, 4, fit=-0.5)
    for name in ("sends", "unsubscribes", "fine_sends", "fine_unsubs"):
        if hasattr(at_once, name):
            assert (getattr(late, name) == getattr(at_once, name)).all(), name
    assert late.rates()[1, 4] == pytest.approx(at_once.rates()[1, 4])


def _decide_loaded(config: LearnerConfig, sends: int) -> tuple[str, float]:
    """``_decide`` for a customer who got ``sends`` messages in the last days (as the learner saw them)."""
    learner = DecisionLearner(config)
    learner.customer(2).sends.extend(NOW - (sends - k) * DAY + HOUR_MS for k in range(sends))
    return _decide(learner, customer=2)


@pytest.mark.parametrize("sends", [0, 5])
def test_volume_optimism_shrinks_with_the_customers_recent_load(sends: int) -> None:
    """At a cost just above what the mean is worth, the hope sends to a rested customer, not to a loaded one.

    Without ``volume_optimism_load`` the same optimism sends to both.
    """
    _, p_mean = _decide_loaded(LearnerConfig(), sends)
    rate = float(DecisionLearner().hazard.rates()[0, sends])
    cost = 1.2 * p_mean / rate  # the value at the posterior mean: p_mean - 1.2 p_mean < 0
    assert _decide_loaded(LearnerConfig(unsubscribe_cost=cost), sends)[0] == "none"
    flat = LearnerConfig(unsubscribe_cost=cost, volume_optimism=1.0)
    assert _decide_loaded(flat, sends)[0] == "send"
    shrinking = replace(flat, volume_optimism_load=1.0)
    action, p = _decide_loaded(shrinking, sends)
    assert action == ("send" if sends == 0 else "none")
    assert p == pytest.approx(p_mean)
