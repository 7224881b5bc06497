"""The causal model: which conversions did each channel cause?

Path models credit conversions by how often a channel appears on converting paths;
about half of all conversions would have happened anyway, and channels that are
merely frequent collect their share. This model instead fits *how conversions
arrive over time*, on every customer, converters and non-converters alike:

    rate(t) = baseline + sum_c sum_b theta_cb * k_b(stock age)           (main effects)
                       + sum_{c<d} theta_cd * s_c(t) * s_d(t)             (pair synergies)

where each touch of channel ``c`` adds ``k_b(age) = 2 ** (-age / half_life_b)`` for a
few fixed half-lives ``b`` (6 h to 10 d), up to the window. The non-negative mixture
over ``b`` *is* the channel's learned decay. Every customer is at risk from when they
were first seen (the period's start, or later for a late arrival:
``TouchLog.observed_from_ms``) until their conversion (or throughout, if customers
convert more than once), right-censored at the data's end, so converters' and
non-converters' windows are aligned. The likelihood is a Poisson process's: the rate at each
conversion against the integral of the rate over all at-risk time; both are sums of
closed-form terms, so fitting touches only the conversions (a matrix) and one vector
of integrals, by L-BFGS-B with non-negative parameters.

Credit is a removal counterfactual on the fitted model: for each customer, the
expected conversions with and without marketing (``1 - exp(-integral of rate)``),
the difference split over channels by their share of the marketing part of the
rate, with each pair synergy split equally between its two channels (Shapley on the
rate; Aumann-Shapley through the exponential). The conversions that would have
happened anyway (the baseline) stay with no channel. Per conversion, each touch's
credit is its share of the rate at that moment (the posterior probability that it
caused the conversion), scaled so channel totals match the counterfactual.

Measured holdout lift (:mod:`cadence.engine.attribution.holdout`) calibrates a
channel's credit when a randomised experiment exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize  # type: ignore[import-untyped]

from cadence.engine.attribution.journeys import DAY_MS, FloatArray, IntArray, Journeys, TouchLog

__all__ = ["DEFAULT_MIN_LAG_MS", "HALF_LIVES_DAYS", "CausalFit", "causal", "default_min_lag", "fit_causal"]

#: Half-lives of the decay bases, in days (those longer than the window are dropped).
HALF_LIVES_DAYS = (0.25, 1.0, 3.0, 10.0)
#: The half-life of the stocks whose products model pair synergies.
INTERACTION_HALF_LIFE_DAYS = 2.0
LN2 = float(np.log(2.0))
#: By default a touch acts from one hour after it: touches in the last hour before a
#: conversion may be *caused by* it (a branded search, a direct visit to buy).
DEFAULT_MIN_LAG_MS = 3_600_000


@dataclass
class CausalFit:
    """A fitted causal model and what it says."""

    channels: tuple[str, ...]
    half_lives_days: tuple[float, ...]
    baseline_rate: float  # conversions per customer-day with no marketing
    main: FloatArray  # (channels, bases) rate per unit of basis stock, per day
    pairs: FloatArray  # (channels, channels) symmetric synergy rates, zero diagonal
    repeat: bool  # customers convert more than once: at risk throughout
    min_lag_days: float = 0.0  # a touch acts only this long after it happens
    credit: FloatArray = field(default_factory=lambda: np.zeros(0))  # per channel
    baseline_conversions: float = 0.0  # expected conversions that happen anyway
    expected_conversions: float = 0.0  # expected conversions with all marketing
    interactions: dict[tuple[str, str], float] = field(default_factory=dict)
    calibration: dict[str, float] = field(default_factory=dict)
    customer_credit: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))  # (customers, channels)

    def half_life(self, channel: str) -> float | None:
        """The learned half-life (days) of a channel's effect, None when it has none.

        It is the age at which the fitted mixture of decays falls to half its start.
        """
        w = self.main[self.channels.index(channel)]
        if w.sum() <= 0:
            return None
        ages = np.linspace(0.0, 4 * max(self.half_lives_days), 4001)
        curve = (w[None, :] * np.exp2(-ages[:, None] / np.array(self.half_lives_days)[None, :])).sum(axis=1)
        return float(ages[int(np.argmax(curve <= curve[0] / 2))])

    @property
    def share_anyway(self) -> float:
        """The share of conversions that would have happened without any marketing."""
        return self.baseline_conversions / self.expected_conversions if self.expected_conversions else 0.0

    def by_channel(self) -> dict[str, float]:
        """Estimated incremental conversions per channel."""
        return {c: float(v) for c, v in zip(self.channels, self.credit, strict=True)}


def _sorted_touches(log: TouchLog) -> tuple[IntArray, IntArray, IntArray]:
    order = np.lexsort((log.touch_ms, log.touch_customer))
    return log.touch_customer[order], log.touch_ms[order], log.touch_channel[order]


def _segment_end(
    cust: IntArray, ms: IntArray, log: TouchLog, end_ms: int, repeat: bool
) -> tuple[IntArray, IntArray, FloatArray]:
    """Per touch: the end of its at-risk segment (next conversion or period end), the
    segment id (index of that conversion, or -1-customer), and whether it is at risk."""
    corder = np.lexsort((log.conv_ms, log.conv_customer))
    c_cust, c_ms = log.conv_customer[corder], log.conv_ms[corder]
    # The customer's conversions are contiguous; find the first at or after each touch.
    shift = 42
    base = min(int(ms.min()) if ms.size else 0, int(c_ms.min()) if c_ms.size else 0)
    c_key = (c_cust << shift) | (c_ms - base)
    t_key = (cust << shift) | (ms - base)
    nxt = np.searchsorted(c_key, t_key, side="left")
    ok = nxt < c_key.shape[0]
    nxt_c = np.minimum(nxt, max(c_key.shape[0] - 1, 0))
    same = ok & (c_cust[nxt_c] == cust) if c_key.size else np.zeros(cust.shape, dtype=bool)
    seg_end = np.where(same, c_ms[nxt_c] if c_key.size else 0, end_ms)
    seg_id = np.where(same, nxt_c, -1 - cust)
    at_risk = np.ones(cust.shape[0])
    if not repeat and c_key.size:
        # One conversion each: after it the customer is no longer at risk.
        first = np.full(int(cust.max()) + 1 if cust.size else 0, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, c_cust[c_cust < first.shape[0]], c_ms[c_cust < first.shape[0]])
        at_risk = (ms <= first[cust]).astype(np.float64)
    return seg_end.astype(np.int64), seg_id.astype(np.int64), at_risk


def _touch_pairs(
    cust: IntArray, seg: IntArray, chan: IntArray, max_lag: int = 64
) -> tuple[IntArray, IntArray]:
    """Index pairs (i < j) of touches of one customer and segment on different channels."""
    left: list[IntArray] = []
    right: list[IntArray] = []
    n = cust.shape[0]
    idx = np.arange(n, dtype=np.int64)
    for lag in range(1, max_lag + 1):
        if idx.size == 0:
            break
        idx = idx[idx + lag < n]
        same = (cust[idx + lag] == cust[idx]) & (seg[idx + lag] == seg[idx])
        idx = idx[same]
        diff = chan[idx] != chan[idx + lag]
        left.append(idx[diff])
        right.append(idx[diff] + lag)
    if not left:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(left), np.concatenate(right)


def _pair_integral(ta: FloatArray, tb: FloatArray, upto: FloatArray, tau: float) -> FloatArray:
    """Integral over [max(ta, tb), upto] of exp(-(t-ta)/tau) * exp(-(t-tb)/tau) (days)."""
    later = np.maximum(ta, tb)
    span = np.clip(upto - later, 0.0, None)
    return np.exp(-np.abs(ta - tb) / tau) * (tau / 2.0) * (1.0 - np.exp(-2.0 * span / tau))


def fit_causal(
    log: TouchLog,
    journeys: Journeys,
    *,
    window_ms: int,
    half_lives_days: Sequence[float] = HALF_LIVES_DAYS,
    interactions: bool = True,
    max_fit_customers: int = 200_000,
    min_lag_ms: int = 0,
    seed: int = 0,
) -> CausalFit:
    """Fit the conversion-rate model on every customer (see the module docstring).

    ``min_lag_ms`` guards against touches *caused by* the coming conversion (a
    branded search minutes before buying): a touch only starts to act that long
    after it happens, so such touches explain nothing. ``max_fit_customers`` fits on a
    random subset of customers (all of their touches and conversions) when there are
    more; credit is always computed for every customer.
    """
    k = len(log.channels)
    window_days = window_ms / DAY_MS
    hls = tuple(h for h in half_lives_days if h <= window_days) or (min(half_lives_days),)
    taus = np.array(hls) / LN2
    n_b = len(hls)
    t0_ms, t1_ms = log.period()
    n_cust = log.n_customers
    conv_per_customer = np.bincount(log.conv_customer, minlength=n_cust)
    repeat = bool(conv_per_customer.max() > 1) if conv_per_customer.size else False

    rng = np.random.default_rng(seed)
    frac = min(1.0, max_fit_customers / max(n_cust, 1))
    chosen = rng.random(n_cust) < frac if frac < 1.0 else np.ones(n_cust, dtype=bool)

    cust, ms, chan = _sorted_touches(log)
    keep = chosen[cust]
    cust, ms, chan = cust[keep], ms[keep], chan[keep]
    seg_end, seg_id, at_risk = _segment_end(cust, ms, log, t1_ms, repeat)
    lag_days = min_lag_ms / DAY_MS
    t_days = (ms - t0_ms) / DAY_MS + lag_days
    upto = (np.minimum(ms + window_ms, seg_end) - t0_ms) / DAY_MS
    dur = np.clip(upto - t_days, 0.0, None) * at_risk

    # Integrals of every feature over all at-risk time of the chosen customers, each
    # from when they were first seen (late arrivals are not at risk before).
    observed = log.observed_from()
    if repeat:
        exposure0 = float(((t1_ms - observed[chosen]) / DAY_MS).sum())
    else:
        first = np.full(n_cust, t1_ms, dtype=np.int64)
        np.minimum.at(first, log.conv_customer, log.conv_ms)
        exposure0 = float(((first[chosen] - observed[chosen]) / DAY_MS).sum())
    n_pairs = k * (k - 1) // 2 if interactions else 0
    n_feat = 1 + k * n_b + n_pairs
    integral = np.zeros(n_feat)
    integral[0] = exposure0
    for b, tau in enumerate(taus):
        contrib = tau * (1.0 - np.exp(-dur / tau))
        integral[1 + b : 1 + k * n_b : n_b] = np.bincount(chan, weights=contrib, minlength=k)
    pair_index = np.full((k, k), -1, dtype=np.int64)
    if interactions:
        iu = np.triu_indices(k, 1)
        pair_index[iu] = np.arange(n_pairs) + 1 + k * n_b
        pair_index[(iu[1], iu[0])] = pair_index[iu]
        tau_i = INTERACTION_HALF_LIFE_DAYS / LN2
        li, ri = _touch_pairs(cust, seg_id, chan)
        live = (at_risk[li] > 0) & (at_risk[ri] > 0)
        li, ri = li[live], ri[live]
        val = _pair_integral(t_days[li], t_days[ri], np.minimum(upto[li], upto[ri]), tau_i)
        integral[1 + k * n_b :] = np.bincount(
            pair_index[chan[li], chan[ri]] - 1 - k * n_b, weights=val, minlength=n_pairs
        )

    # Features at each conversion of the chosen customers (their journeys' touches).
    conv_j = np.flatnonzero((journeys.converted > 0) & chosen[journeys.customer])
    x = _event_features(journeys, conv_j, taus, pair_index if interactions else None, n_feat, lag_days)

    usable = integral > 0
    xs = x[:, usable] / integral[usable]
    n_ev = xs.shape[0]

    def objective(phi: FloatArray) -> tuple[float, FloatArray]:
        rate = xs @ phi
        rate = np.maximum(rate, 1e-300)
        value = -float(np.log(rate).sum()) + float(phi.sum())
        grad = 1.0 - xs.T @ (1.0 / rate)
        return value, grad

    m = int(usable.sum())
    if m == 0 or n_ev == 0:
        # No exposure or no conversion to learn from: nothing is credited.
        return CausalFit(
            channels=log.channels,
            half_lives_days=hls,
            baseline_rate=0.0,
            main=np.zeros((k, n_b)),
            pairs=np.zeros((k, k)),
            repeat=repeat,
            min_lag_days=lag_days,
        )
    start = np.full(m, max(n_ev, 1) / m)
    result = minimize(
        objective,
        start,
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, None)] * m,
        options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8},
    )
    theta = np.zeros(n_feat)
    theta[usable] = result.x / integral[usable]
    main = theta[1 : 1 + k * n_b].reshape(k, n_b)
    pairs = np.zeros((k, k))
    if interactions:
        iu = np.triu_indices(k, 1)
        pairs[iu] = theta[1 + k * n_b :]
        pairs = pairs + pairs.T
    return CausalFit(
        channels=log.channels,
        half_lives_days=hls,
        baseline_rate=float(theta[0]),
        main=main,
        pairs=pairs,
        repeat=repeat,
        min_lag_days=lag_days,
    )


def _event_features(
    journeys: Journeys,
    conv_j: IntArray,
    taus: FloatArray,
    pair_index: IntArray | None,
    n_feat: int,
    lag_days: float,
) -> FloatArray:
    """(len(conv_j), n_feat) features at the conversions ending journeys ``conv_j``."""
    k = len(journeys.channels)
    n_b = taus.shape[0]
    row_of = np.full(journeys.n_journeys, -1, dtype=np.int64)
    row_of[conv_j] = np.arange(conv_j.shape[0])
    touch_row = row_of[journeys.touch_journey]
    sel = touch_row >= 0
    rows = touch_row[sel]
    age = (journeys.end_ms[journeys.touch_journey[sel]] - journeys.touch_ms[sel]) / DAY_MS - lag_days
    acts = age >= 0
    rows, age, ch = rows[acts], age[acts], journeys.touch_channel[sel][acts]
    x = np.zeros((conv_j.shape[0], n_feat))
    x[:, 0] = 1.0
    flat = x.reshape(-1)
    for b, tau in enumerate(taus):
        np.add.at(flat, rows * n_feat + 1 + ch * n_b + b, np.exp(-age / tau))
    if pair_index is not None:
        tau_i = INTERACTION_HALF_LIFE_DAYS / LN2
        stock = np.zeros((conv_j.shape[0], k))
        np.add.at(stock.reshape(-1), rows * k + ch, np.exp(-age / tau_i))
        iu = np.triu_indices(k, 1)
        x[:, pair_index[iu]] = stock[:, iu[0]] * stock[:, iu[1]]
    return x


def _customer_hazards(
    fit: CausalFit, log: TouchLog, *, window_ms: int, chunk: int = 2_000_000
) -> tuple[FloatArray, FloatArray]:
    """Per customer: the marketing part of the integrated rate per channel over the
    whole period (pair synergies half to each side), and the baseline integral."""
    k = len(fit.channels)
    n_cust = log.n_customers
    t0_ms, t1_ms = log.period()
    taus = np.array(fit.half_lives_days) / LN2
    lam = np.zeros((n_cust, k))
    cust, ms, chan = _sorted_touches(log)
    t_days = (ms - t0_ms) / DAY_MS + fit.min_lag_days
    upto = (np.minimum(ms + window_ms, t1_ms) - t0_ms) / DAY_MS
    dur = np.clip(upto - t_days, 0.0, None)
    contrib = np.zeros(cust.shape[0])
    for b, tau in enumerate(taus):
        contrib += fit.main[chan, b] * tau * (1.0 - np.exp(-dur / tau))
    np.add.at(lam.reshape(-1), cust * k + chan, contrib)
    paired = np.flatnonzero(fit.pairs.any(axis=0))
    lo = 0
    n = cust.shape[0]
    while paired.size and lo < n:
        # Chunks of whole customers keep the pair arrays small.
        hi = min(lo + chunk, n)
        if hi < n:
            hi = int(np.searchsorted(cust, cust[hi], side="left")) or n
        sl = slice(lo, hi)
        c_cust, c_chan, c_t, c_up = cust[sl], chan[sl], t_days[sl], upto[sl]
        # Only touches on channels with a synergy can form a pair that matters.
        useful = np.flatnonzero(np.isin(c_chan, paired))
        c_cust, c_chan, c_t, c_up = c_cust[useful], c_chan[useful], c_t[useful], c_up[useful]
        # The counterfactual has no conversions: one segment per customer.
        li, ri = _touch_pairs(c_cust, -1 - c_cust, c_chan)
        w = fit.pairs[c_chan[li], c_chan[ri]]
        live = w > 0
        li, ri, w = li[live], ri[live], w[live]
        val = w * _pair_integral(
            c_t[li], c_t[ri], np.minimum(c_up[li], c_up[ri]), INTERACTION_HALF_LIFE_DAYS / LN2
        )
        np.add.at(lam.reshape(-1), c_cust[li] * k + c_chan[li], val / 2)
        np.add.at(lam.reshape(-1), c_cust[ri] * k + c_chan[ri], val / 2)
        lo = hi
    base = fit.baseline_rate * (t1_ms - log.observed_from()) / DAY_MS
    return lam, base.astype(np.float64)


def default_min_lag(log: TouchLog) -> int:
    """One hour, or 0 when every timestamp is a whole day (dates without a time).

    >>> log = TouchLog(channels=("a",), customer_ids=["x"], touch_customer=np.array([0]),
    ...     touch_ms=np.array([5 * DAY_MS]), touch_channel=np.array([0]), conv_customer=np.array([0]),
    ...     conv_ms=np.array([6 * DAY_MS]), conv_value=np.array([1.0]))
    >>> default_min_lag(log)
    0
    """
    whole_days = not (np.any(log.touch_ms % DAY_MS) or np.any(log.conv_ms % DAY_MS))
    return 0 if whole_days else DEFAULT_MIN_LAG_MS


def causal(
    log: TouchLog,
    journeys: Journeys,
    *,
    window_ms: int,
    half_lives_days: Sequence[float] = HALF_LIVES_DAYS,
    interactions: bool = True,
    calibration: Mapping[str, float] | None = None,
    max_fit_customers: int = 200_000,
    min_lag_ms: int | None = None,
    fit: CausalFit | None = None,
) -> tuple[FloatArray, CausalFit]:
    """Fit, then credit: per touch credit (conversions) and the fit with its report.

    >>> from cadence.sim.journeys import simulate
    >>> sim = simulate("simple", customers=20_000, seed=5)
    >>> log = TouchLog(channels=sim.channels, customer_ids=[str(i) for i in range(sim.n_customers)],
    ...     touch_customer=sim.touch_customer, touch_ms=sim.touch_ms, touch_channel=sim.touch_channel,
    ...     conv_customer=sim.conv_customer, conv_ms=sim.conv_ms, conv_value=sim.conv_value)
    >>> credit, fit = causal(log, log.journeys(30 * DAY_MS), window_ms=30 * DAY_MS)
    >>> top = max(fit.by_channel(), key=fit.by_channel().get)
    >>> top in ("email", "paid_search"), 0.4 < fit.share_anyway < 0.8
    (True, True)
    """
    if min_lag_ms is None:
        min_lag_ms = default_min_lag(log)
    if fit is None:
        fit = fit_causal(
            log,
            journeys,
            window_ms=window_ms,
            half_lives_days=half_lives_days,
            interactions=interactions,
            max_fit_customers=max_fit_customers,
            min_lag_ms=min_lag_ms,
        )
    k = len(fit.channels)
    factors = np.ones(k)
    for name, f in (calibration or {}).items():
        if name in fit.channels:
            factors[fit.channels.index(name)] = max(float(f), 0.0)
    fit.calibration = dict(calibration or {})
    lam, base = _customer_hazards(fit, log, window_ms=window_ms)
    lam *= factors[None, :]
    marketing = lam.sum(axis=1)
    p_none = 1.0 - np.exp(-base)
    p_all = 1.0 - np.exp(-(base + marketing))
    incremental = p_all - p_none
    share = np.divide(lam, marketing[:, None], out=np.zeros_like(lam), where=marketing[:, None] > 0)
    fit.customer_credit = share * incremental[:, None]
    fit.credit = fit.customer_credit.sum(axis=0)
    fit.baseline_conversions = float(p_none.sum())
    fit.expected_conversions = float(p_all.sum())
    touch_credit, pair_credit = _touch_posteriors(fit, journeys, factors)
    # Per conversion shares, rescaled so channel totals follow the counterfactual.
    got = np.bincount(journeys.touch_channel, weights=touch_credit, minlength=k)
    ratio = np.divide(fit.credit, got, out=np.zeros(k), where=got > 0)
    fit.interactions = {
        (fit.channels[a], fit.channels[b]): float(pair_credit[a, b])
        for a in range(k)
        for b in range(a + 1, k)
        if pair_credit[a, b] > 0
    }
    return touch_credit * ratio[journeys.touch_channel], fit


def _touch_posteriors(
    fit: CausalFit, journeys: Journeys, factors: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Per touch: its share of the rate at its journey's conversion; per channel pair:
    the conversions attributed to the synergy."""
    k = len(fit.channels)
    taus = np.array(fit.half_lives_days) / LN2
    age = (journeys.end_ms[journeys.touch_journey] - journeys.touch_ms) / DAY_MS - fit.min_lag_days
    conv = (journeys.converted[journeys.touch_journey] > 0) & (age >= 0)
    age = np.maximum(age, 0.0)
    ch = journeys.touch_channel
    main = np.zeros(journeys.n_touches)
    for b, tau in enumerate(taus):
        main += fit.main[ch, b] * np.exp(-age / tau)
    main *= factors[ch] * conv
    rate = np.full(journeys.n_journeys, fit.baseline_rate)
    rate += np.bincount(journeys.touch_journey, weights=main, minlength=journeys.n_journeys)
    pair_credit = np.zeros((k, k))
    inter = np.zeros(journeys.n_touches)
    if fit.pairs.any():
        conv_j = np.flatnonzero(journeys.converted > 0)
        row_of = np.full(journeys.n_journeys, -1, dtype=np.int64)
        row_of[conv_j] = np.arange(conv_j.shape[0])
        rows = row_of[journeys.touch_journey]
        kern = np.exp(-age / (INTERACTION_HALF_LIFE_DAYS / LN2))
        stock = np.zeros((conv_j.shape[0], k))
        np.add.at(stock.reshape(-1), rows[conv] * k + ch[conv], kern[conv])
        pairs = fit.pairs * np.sqrt(factors[:, None] * factors[None, :])
        weighted = stock @ pairs  # per event, per channel: sum_d theta_cd s_d
        pair_rate = 0.5 * (stock * weighted).sum(axis=1)
        rate[conv_j] += pair_rate
        inter[conv] = 0.5 * weighted[rows[conv], ch[conv]] * kern[conv]
        safe = np.maximum(rate[conv_j], 1e-300)
        per_event = stock[:, :, None] * stock[:, None, :] * pairs[None, :, :] / safe[:, None, None]
        pair_credit = per_event.sum(axis=0) if conv_j.shape[0] * k * k < 50_000_000 else pair_credit
    denom = rate[journeys.touch_journey]
    credit = np.divide(main + inter, denom, out=np.zeros_like(main), where=conv & (denom > 0))
    return credit, pair_credit
