"""The causal model against simulated truth, and its calibration to holdout lift."""

from __future__ import annotations

import numpy as np
import pytest

from cadence.engine.attribution.files import Holdouts
from cadence.engine.attribution.holdout import calibration_factors, measure_lifts
from cadence.engine.attribution.journeys import DAY_MS, TouchLog
from cadence.engine.attribution.models import run_model
from cadence.engine.attribution.scoring import score
from cadence.sim.journeys import SimResult, simulate

WINDOW = 30 * DAY_MS


def as_log(sim: SimResult) -> TouchLog:
    return TouchLog(
        channels=sim.channels,
        customer_ids=[str(i) for i in range(sim.n_customers)],
        touch_customer=sim.touch_customer,
        touch_ms=sim.touch_ms,
        touch_channel=sim.touch_channel,
        conv_customer=sim.conv_customer,
        conv_ms=sim.conv_ms,
        conv_value=sim.conv_value,
    )


@pytest.fixture(scope="module")
def synergy() -> SimResult:
    return simulate("synergy", customers=40_000, seed=3)


def test_causal_recovers_the_truth_where_path_models_do_not(synergy: SimResult) -> None:
    log = as_log(synergy)
    journeys = log.journeys(WINDOW)
    causal = run_model("causal", log=log, journeys=journeys, window_ms=WINDOW)
    s = score(causal.by_channel(), synergy.truth)
    assert s.pearson >= 0.95
    assert s.wrong_share <= 0.10
    linear = score(
        run_model("linear", log=log, journeys=journeys, window_ms=WINDOW).by_channel(), synergy.truth
    )
    assert linear.wrong_share > s.wrong_share
    fit = causal.causal
    assert fit is not None
    # About 60% of conversions happen anyway in this scenario.
    truth_share = synergy.baseline / synergy.expected
    assert abs(fit.share_anyway - truth_share) < 0.08
    # The strongest synergy (email x sms) is found among the reported pairs.
    assert ("email", "sms") in fit.interactions
    # Learned decays: paid search (1 d) is faster than display (5 d).
    ps, disp = fit.half_life("paid_search"), fit.half_life("display")
    assert ps is not None and disp is not None and ps < disp
    # Per-touch credit sums to the channel totals; no credit to touches of open journeys.
    open_touch = journeys.converted[journeys.touch_journey] == 0
    assert np.all(causal.touch_credit[open_touch] == 0)


def test_holdout_lift_calibrates_a_targeted_channel() -> None:
    sim = simulate("targeted", customers=60_000, seed=9)
    log = as_log(sim)
    journeys = log.journeys(WINDOW)
    raw = run_model("causal", log=log, journeys=journeys, window_ms=WINDOW)
    fit = raw.causal
    assert fit is not None
    codes = np.arange(sim.n_customers)
    hold = Holdouts(
        customers={c: codes for c in sim.holdout}, held_out={c: h for c, h in sim.holdout.items()}
    )
    lifts = measure_lifts(log, hold)
    assert set(lifts) == {"display", "email"}
    display = lifts["display"]
    assert display.low < display.high
    on_treated = {
        c: float(fit.customer_credit[codes[~sim.holdout[c]], fit.channels.index(c)].sum()) for c in lifts
    }
    factors = calibration_factors(lifts, on_treated)
    # Display follows intent: observational credit is too high, the holdout says so.
    assert factors["display"] < 1.0
    calibrated = run_model(
        "causal", log=log, journeys=journeys, window_ms=WINDOW, causal_fit=fit, calibration=factors
    )
    err_raw = abs(raw.by_channel()["display"] - sim.truth["display"])
    err_cal = abs(calibrated.by_channel()["display"] - sim.truth["display"])
    assert err_cal < err_raw
    assert score(calibrated.by_channel(), sim.truth).pearson >= 0.85


def test_late_arrivals_are_observed_from_when_first_seen() -> None:
    """70% of customers arrive part-way through: at risk only from then, censored at the data's end."""
    sim = simulate("late", customers=20_000, seed=3)
    assert sim.first_seen_ms is not None
    truth_anyway = sim.baseline / sim.expected
    whole = as_log(sim)
    aligned = TouchLog(**{**whole.__dict__, "observed_from_ms": sim.first_seen_ms})
    fitted = {}
    for name, log in (("whole span", whole), ("aligned", aligned)):
        result = run_model("causal", log=log, journeys=log.journeys(WINDOW), window_ms=WINDOW)
        assert result.causal is not None
        fitted[name] = (score(result.by_channel(), sim.truth), result.causal.share_anyway)
    s, anyway = fitted["aligned"]
    assert s.pearson >= 0.95 and s.wrong_share <= 0.10, s
    assert abs(anyway - truth_anyway) < 0.08, (anyway, truth_anyway)
    # Counting late arrivals as at risk from the start hides baseline conversions in
    # marketing credit: further from the truth on both counts.
    s_whole, anyway_whole = fitted["whole span"]
    assert abs(anyway_whole - truth_anyway) > abs(anyway - truth_anyway) + 0.1
    assert s_whole.wrong_share > s.wrong_share
