"""The learners' best_options: each group's best send time, the same as picking it from score_options."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
from scipy.special import ndtr as ndtr_  # type: ignore[import-untyped]

from cadence.channels import Feedback
from cadence.engine import valuation
from cadence.engine.campaign import DAY_MS, HOUR_MS, Campaign, ChannelPolicy, TemplateSpec
from cadence.engine.decide import OptionGroup, group_bests
from cadence.engine.learners import DecisionLearner, LearnerConfig, _ScoreInputs, _time_parts
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


@pytest.fixture(params=[False, True], ids=["numpy", "compiled"])
def compiled(request: pytest.FixtureRequest) -> Iterator[bool]:
    """best_options valued by numpy (and its shortcut), or by the compiled loop of cadence.engine.valuation."""
    if request.param:
        pytest.importorskip("numba")
        assert valuation.load_now() is not None
    was = valuation.set_enabled(request.param)
    try:
        yield request.param
    finally:
        valuation.set_enabled(was)


@pytest.mark.parametrize(
    "config",
    [
        LearnerConfig(),
        LearnerConfig(explore_volume=True, unsubscribe_cost=25.0),
        LearnerConfig(click_value=2.0, beta=0.8),
        LearnerConfig(volume_optimism=0.25, explore_unsubscribe=True),
        LearnerConfig(hazard_fit=False, volume_optimism=0.0, label_delay_ms=None),
        LearnerConfig(volume_optimism_load=0.5, click_value=0.5, unsubscribe_cost=3.0),
    ],
    ids=["default", "explore-volume", "value-beta", "optimism", "plain", "optimism-load"],
)
@pytest.mark.parametrize("labels", [0, 600])
def test_best_options_picks_what_score_options_values_highest(
    config: LearnerConfig, labels: int, compiled: bool
) -> None:
    assert (valuation.kernel() is not None) == compiled
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
        valuation.set_enabled(compiled)  # the reference is numpy's full valuation either way
        got = learner.best_options(profile=profile, groups=shaped, now_ms=now, seed=i)
        assert got == full
        chosen.update(got[0])
    assert len(chosen) > 1  # the best time is not always the first: the draw and the hours matter


def test_compiled_valuation_brackets_the_normal_cdf() -> None:
    """The table's chord +- TABLE_EPS contains scipy's ndtr everywhere on the table's range."""
    from scipy.special import ndtr

    x = np.random.default_rng(3).uniform(valuation.TABLE_LO, -valuation.TABLE_LO, 200_000)
    x = np.concatenate((x, valuation.TABLE_LO + (np.arange(valuation.TABLE_N) + 0.5) / valuation.TABLE_STEP))
    t = (x - valuation.TABLE_LO) * valuation.TABLE_STEP
    i = t.astype(np.int64)
    chord = valuation.TABLE[i] + (t - i) * (valuation.TABLE[i + 1] - valuation.TABLE[i])
    gap = np.abs(ndtr(x) - chord)
    assert gap.max() < valuation.TABLE_EPS
    assert gap.max() > valuation.TABLE_EPS / 2  # the bound is near what it must cover, not vacuous


def test_compiled_valuation_follows_numpy_on_nan_and_ties() -> None:
    """Equal scores give the first time, and a NaN score is chosen as argmax chooses it."""
    pytest.importorskip("numba")
    kern = valuation.load_now()
    assert kern is not None
    n_groups, n_times = 3, 6
    pg0 = np.array([-1.5, -1.5, -1.6])
    pg1 = np.array([-1.4, -1.4, -1.3])
    tw0 = np.zeros(n_times)
    tw1 = np.array([0.0, 0.2, 0.2, 0.1, 0.2, 0.0])  # ties of the draw at times 1, 2 and 4
    tv = np.full(n_times, 0.1)
    pgv = np.array([0.2, np.nan, 0.2])  # group 1: every mean score NaN (never worth sending)
    rates = np.array([0.001, 0.002, 0.001])
    out = (
        np.empty(n_groups, dtype=np.int64),
        np.empty(n_groups),
        np.empty(n_groups),
        np.empty(n_groups),
        np.empty(n_groups, dtype=bool),
        np.empty(n_groups),
        np.empty(n_groups),
    )
    empty = np.empty(0)
    kern(pg0, pg1, pgv, tw0, tw1, tv, empty, 10.0 * rates, empty, empty, rates,
         np.array([0, 0, 1]), 2, 1.0, 1.0, 1.0, False, False, False, False, valuation.TABLE, *out)  # fmt: skip
    # The numpy valuation of the same options (learners._score's arithmetic), and argmax.
    spread = np.sqrt((pgv[:, None] + tv[None, :]) + 1.0)
    p0 = ndtr_((pg0[:, None] + tw0[None, :]) / spread)
    p1 = ndtr_(pg1[:, None] + tw1[None, :])
    risk = (10.0 * rates)[:, None]
    score, mean_score = p1 - risk, p0 - risk
    drawn = score.copy()
    worth = mean_score > 0
    score = np.where(worth & (score <= 0), mean_score * 1e-6, score)
    score = np.where(~worth, np.minimum(score, 0.0), score)
    first = score.argmax(axis=1)
    rows = np.arange(n_groups)
    assert out[0].tolist() == first.tolist() == [1, 0, 1]  # the first of tied draws; group 1 all 0
    assert out[1].tolist() == score[rows, first].tolist()
    assert np.array_equal(out[2], p0[rows, first], equal_nan=True)
    camp_best = np.maximum.reduceat(np.maximum.reduce(mean_score, axis=1), [0, 2])[[0, 0, 1]]
    assert out[4].tolist() == (mean_score[rows, first] < camp_best - 1e-12).tolist() == [False] * 3
    # What the explanation shows: the drawn value (before the fix-ups) and the mean value there.
    assert out[5].tolist() == drawn[rows, first].tolist()
    assert np.array_equal(out[6], mean_score[rows, first], equal_nan=True)


@pytest.fixture
def parts_on() -> Iterator[None]:
    """The compiled score parts switched on for one test (a served process's way), then back off."""
    pytest.importorskip("numba")
    assert valuation.load_now() is not None
    was = valuation.set_parts(True)
    try:
        yield
    finally:
        valuation.set_parts(was)


@pytest.mark.parametrize(
    "config",
    [
        LearnerConfig(),
        LearnerConfig(hour_onehot=False, hour_pop_draw=False, customer_channel_var=0.3),
        LearnerConfig(hour_model=False, hour_offset_scale=0.8, hour_draw_scale=1.0),
    ],
    ids=["default", "smooth-hours", "no-hour-model"],
)
def test_compiled_score_parts_are_numpys_to_rounding(config: LearnerConfig, parts_on: None) -> None:
    """valuation.score_parts gives what the numpy parts give, for known and new customers and shapes."""
    learner = _trained(config, 600)
    rng = random.Random(11)
    checked = {"effect": 0, "prior": 0, "match": 0}
    for i in range(60):
        now = NOW + i * 3_700_000
        n_times = rng.choice([1, 5, 24])
        times = [now + k * HOUR_MS for k in range(n_times)]
        channels = rng.sample(CHANNELS, rng.randrange(1, 5))
        groups = [OptionGroup(_campaign(f"c{c}"), ch, None, times) for c in range(3) for ch in channels]
        customer = 1 + (i * 7) % 70  # 1-59 had sends, 60-70 are new
        stats = learner.customer(customer)
        traits = TRAITS if i % 3 else {"plan": "free", "visits": i}
        sig = tuple((g[0].name, g[1], g[2]) for g in groups)
        struct = learner._group_struct(sig)
        b = learner._customer_vector(stats, traits, now)
        t1 = learner._traits1(traits)
        harm, harm_sq, hours, whole = _time_parts("Europe/Berlin", tuple(times))
        noise_e, noise_u = learner._noise(i)
        angle, scale = (0.7, 0.4) if stats.clicks else (0.0, 0.0)
        inputs = _ScoreInputs(
            stats, traits, b, t1, harm, harm_sq, hours, whole, learner._rate_exp(stats), angle, scale,
            struct, noise_e, noise_u,
        )  # fmt: skip
        want = learner._parts_numpy(inputs)
        got = learner._parts_compiled(valuation.parts_kernel(), inputs)
        checked["effect" if stats.effect is not None else "prior"] += 1
        checked["match"] += bool(stats.clicks)
        for name, w, g in zip(
            ("per_group", "per_group_v", "eff_sd", "time_w", "time_v", "hour_rows"), want, got, strict=True
        ):
            if w is None:
                assert g is None, name
                continue
            w = np.broadcast_to(w, np.shape(g))
            assert np.allclose(g, w, rtol=1e-12, atol=1e-12), name
    assert min(checked.values()) > 5  # known customers with an effect, new ones at the prior, hour matches


def test_decisions_with_compiled_score_parts_pick_what_numpy_picks(parts_on: None) -> None:
    """best_options and score_options agree with each other with the compiled parts, and with numpy's picks."""
    learner = _trained(LearnerConfig(), 600)
    groups = [OptionGroup(_campaign(f"c{c}"), ch, None, ()) for c in range(5) for ch in CHANNELS]
    for i in range(40):
        now = NOW + i * 5_100_000
        times = [now, *((now // HOUR_MS + 1 + k) * HOUR_MS for k in range(23))]
        shaped = [g._replace(times=times) for g in groups]
        profile = MemoryProfile(customer_id=1 + i % 7, timezone="America/New_York", traits=TRAITS)
        got = learner.best_options(profile=profile, groups=shaped, now_ms=now, seed=i)
        assert got == group_bests(
            learner.score_options(profile=profile, groups=shaped, now_ms=now, seed=i), len(shaped)
        )
        valuation.set_parts(False)
        numpy_pick = learner.best_options(profile=profile, groups=shaped, now_ms=now, seed=i)
        valuation.set_parts(True)
        assert got[0] == numpy_pick[0]
        assert np.allclose(got[1], numpy_pick[1], rtol=1e-12, atol=1e-15)


def test_compiled_score_parts_wait_for_a_served_process() -> None:
    """The background load gives the bit-identical valuation only; the parts need load_now(parts=True)."""
    pytest.importorskip("numba")
    was = valuation.set_parts(False)
    try:
        assert valuation.load_now() is not None
        assert valuation.parts_kernel() is None
        assert valuation.load_now(parts=True) is not None
        assert valuation.parts_kernel() is not None
    finally:
        valuation.set_parts(was)
