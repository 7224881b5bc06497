"""Journeys with known causal truth, to score attribution models.

Every customer is observed for ``days`` days. Each channel touches customers as a
Poisson process (its own frequency; a *targeted* channel touches high-intent
customers more). A customer converts at most once, at the first event of a
conversion process whose rate is

    baseline * intent  +  sum over channels  effect_c * stock_c(t)
                       +  sum over pairs     synergy_cd * stock_c(t) * stock_d(t)

where ``stock_c(t)`` sums ``2 ** (-age / half_life_c)`` over the channel's earlier
touches. ``intent`` is a per-customer log-normal factor (mean 1). Channels with no
effect still touch customers; an *intent* channel's touches are also caused by the
coming conversion (a branded search minutes before buying). Touches keep coming
after a conversion. An optional randomised holdout withholds a channel from a
share of customers.

Truth is computed by counterfactual, in expectation: a channel's incremental
conversions are the expected conversions lost when its touches are removed (with
everything else as it was); the baseline is the expected conversions with no
marketing at all.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt

__all__ = ["SCENARIOS", "ChannelSim", "Scenario", "SimResult", "simulate", "write_files"]

DAY_MS = 86_400_000
EPOCH_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)


@dataclass(frozen=True)
class ChannelSim:
    """One simulated channel."""

    name: str
    frequency: float  # touches per customer per day
    effect: float  # conversion rate added per unit of stock (per day)
    half_life_days: float = 3.0
    targeting: float = 0.0  # frequency multiplied by intent ** targeting
    intent_touch: float = 0.0  # probability a converter gets a touch just before converting
    holdout: float = 0.0  # share of customers randomly withheld from this channel


@dataclass(frozen=True)
class Scenario:
    """A simulated market."""

    name: str
    channels: Sequence[ChannelSim]
    baseline: float = 0.0018  # conversions per customer-day without marketing (mean intent)
    intent_sigma: float = 0.6
    synergies: Mapping[tuple[str, str], float] = field(default_factory=dict)
    days: int = 60
    #: share of customers who arrive late (first seen at a uniform time in the period):
    #: before it they have no touch, no conversion, and are not at risk
    arrivals: float = 0.0


_CHANNELS = (
    ChannelSim("email", frequency=0.020, effect=0.0072, half_life_days=2.0),
    ChannelSim("paid_search", frequency=0.008, effect=0.0290, half_life_days=1.0),
    ChannelSim("display", frequency=0.025, effect=0.0012, half_life_days=5.0),
    ChannelSim("social", frequency=0.015, effect=0.0, half_life_days=3.0),
    ChannelSim("sms", frequency=0.005, effect=0.0230, half_life_days=1.5),
    ChannelSim("affiliate", frequency=0.004, effect=0.0, half_life_days=3.0),
    ChannelSim("push", frequency=0.008, effect=0.0145, half_life_days=0.5),
)


def _targeted() -> tuple[ChannelSim, ...]:
    out = []
    for c in _CHANNELS:
        if c.name == "display":
            c = replace(c, targeting=1.5, holdout=0.2)  # retargeting: follows intent
        if c.name == "email":
            c = replace(c, targeting=1.0, holdout=0.1)
        out.append(c)
    return tuple(out)


def _intent() -> tuple[ChannelSim, ...]:
    return (*_CHANNELS, ChannelSim("direct", frequency=0.005, effect=0.0, intent_touch=0.3))


#: Scenarios: ``simple`` (independent channels, two with no effect at all),
#: ``synergy`` (plus pair synergies), ``targeted`` (display and email follow intent,
#: with randomised holdouts on both), ``intent`` (direct visits caused by the coming
#: conversion), ``late`` (``simple`` where 70% of customers are first seen part-way through).
SCENARIOS: dict[str, Scenario] = {
    "simple": Scenario("simple", _CHANNELS),
    "synergy": Scenario(
        "synergy", _CHANNELS, synergies={("email", "sms"): 0.05, ("display", "paid_search"): 0.03}
    ),
    "targeted": Scenario("targeted", _targeted(), synergies={("email", "sms"): 0.05}),
    "intent": Scenario("intent", _intent()),
    "late": Scenario("late", _CHANNELS, arrivals=0.7),
}


@dataclass
class SimResult:
    """Simulated touches, conversions, holdout assignments and truth."""

    scenario: Scenario
    n_customers: int
    touch_customer: npt.NDArray[np.int64]
    touch_ms: npt.NDArray[np.int64]
    touch_channel: npt.NDArray[np.int64]
    conv_customer: npt.NDArray[np.int64]
    conv_ms: npt.NDArray[np.int64]
    conv_value: npt.NDArray[np.float64]
    holdout: dict[str, npt.NDArray[np.bool_]]  # per channel: per customer, withheld?
    truth: dict[str, float]  # expected incremental conversions per channel (Shapley split)
    removal: dict[str, float]  # expected conversions lost when the channel is removed
    baseline: float  # expected conversions with no marketing
    expected: float  # expected conversions with everything
    first_seen_ms: npt.NDArray[np.int64] | None = None  # per customer, when arrivals are simulated

    @property
    def channels(self) -> tuple[str, ...]:
        """Channel names, in code order."""
        return tuple(c.name for c in self.scenario.channels)


def _stock_grid(
    times: npt.NDArray[np.float64],
    who: npt.NDArray[np.int64],
    n: int,
    grid: npt.NDArray[np.float64],
    hl: float,
) -> npt.NDArray[np.float64]:
    """stock(t) at every grid time (rows) for every customer (columns)."""
    steps = grid.shape[0]
    dt = grid[1] - grid[0]
    decay = 2.0 ** (-dt / hl)
    # Each touch enters at the first grid point at or after it, already decayed.
    slot = np.searchsorted(grid, times, side="left")
    ok = slot < steps
    add = np.zeros((steps, n))
    np.add.at(add, (slot[ok], who[ok]), 2.0 ** (-(grid[slot[ok]] - times[ok]) / hl))
    out = np.empty((steps, n))
    acc = np.zeros(n)
    for g in range(steps):
        acc = acc * decay + add[g]
        out[g] = acc
    return out


def simulate(scenario: Scenario | str, *, customers: int, seed: int = 7, chunk: int = 10_000) -> SimResult:
    """Simulate ``customers`` customers of ``scenario`` (a name from :data:`SCENARIOS`).

    >>> r = simulate("simple", customers=2000, seed=1)
    >>> r.truth["social"], r.truth["affiliate"], r.truth["paid_search"] > 0
    (0.0, 0.0, True)
    >>> 0 < r.baseline < r.expected
    True
    """
    sc = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    rng = np.random.default_rng(seed)
    k = len(sc.channels)
    names = [c.name for c in sc.channels]
    pairs = [(names.index(a), names.index(b), g) for (a, b), g in sc.synergies.items()]
    dt = 0.125
    grid = np.arange(0.0, sc.days, dt)
    tc: list[npt.NDArray[np.int64]] = []
    tt: list[npt.NDArray[np.float64]] = []
    tch: list[npt.NDArray[np.int64]] = []
    cc: list[npt.NDArray[np.int64]] = []
    ct: list[npt.NDArray[np.float64]] = []
    removal = np.zeros(k)
    effective = [i for i, c in enumerate(sc.channels) if c.effect > 0]
    coalition = np.zeros(1 << len(effective))
    baseline = expected = 0.0
    holdout = {c.name: rng.random(customers) < c.holdout for c in sc.channels if c.holdout > 0}
    arrived: list[npt.NDArray[np.float64]] = []
    for lo in range(0, customers, chunk):
        n = min(chunk, customers - lo)
        intent = rng.lognormal(-(sc.intent_sigma**2) / 2, sc.intent_sigma, n)
        # Arrival day per customer (0: there from the start); drawn only when simulated,
        # so the other scenarios' random streams are unchanged.
        arrival = np.zeros(n)
        if sc.arrivals > 0:
            arrival = np.where(rng.random(n) < sc.arrivals, rng.random(n) * sc.days, 0.0)
        arrived.append(arrival)
        stocks = []
        touches = []
        for ch in sc.channels:
            rate = ch.frequency * intent**ch.targeting * sc.days
            if ch.name in holdout:
                rate = rate * ~holdout[ch.name][lo : lo + n]
            counts = rng.poisson(rate)
            who = np.repeat(np.arange(n, dtype=np.int64), counts)
            times = rng.random(who.shape[0]) * sc.days
            if sc.arrivals > 0:
                here = times >= arrival[who]
                who, times = who[here], times[here]
            touches.append((who, times))
            stocks.append(_stock_grid(times, who, n, grid, ch.half_life_days) if ch.effect > 0 else None)
        base_rate = sc.baseline * intent

        # The hazard is linear in the stocks, so removal counterfactuals only need integrals.
        h = np.where(grid[:, None] >= arrival[None, :], base_rate[None, :], 0.0)
        at_risk_days = sc.days - arrival
        channel_int = np.zeros((k, n))
        for ci, ch in enumerate(sc.channels):
            s = stocks[ci]
            if s is not None:
                h += ch.effect * s
                channel_int[ci] = ch.effect * s.sum(axis=0) * dt
        pair_int = []
        for a, b, g in pairs:
            sa, sb = stocks[a], stocks[b]
            if sa is not None and sb is not None:
                prod = g * sa * sb
                h += prod
                pair_int.append((a, b, prod.sum(axis=0) * dt))
        full = np.cumsum(h, axis=0) * dt
        del h
        p_full = 1.0 - np.exp(-full[-1])
        expected += float(p_full.sum())
        baseline += float((1.0 - np.exp(-base_rate * at_risk_days)).sum())
        for ci in range(k):
            if stocks[ci] is not None:
                without = full[-1] - channel_int[ci]
                for a, b, pi in pair_int:
                    if ci in (a, b):
                        without = without - pi
                removal[ci] += float((p_full - (1.0 - np.exp(-without))).sum())
        # Expected conversions of every coalition of effective channels (for Shapley).
        for m in range(1 << len(effective)):
            members = {effective[i] for i in range(len(effective)) if m >> i & 1}
            h_end = base_rate * at_risk_days
            for ci in members:
                h_end = h_end + channel_int[ci]
            for a, b, pi in pair_int:
                if a in members and b in members:
                    h_end = h_end + pi
            coalition[m] += float((1.0 - np.exp(-h_end)).sum())
        # Conversion time: first crossing of an Exp(1) draw, interpolated in the step.
        draw = rng.exponential(1.0, n)
        crossed = full[-1] > draw
        step = (full < draw[None, :]).sum(axis=0)
        idx = np.flatnonzero(crossed)
        st = step[idx]
        prev = np.where(st > 0, full[np.maximum(st - 1, 0), idx], 0.0)
        frac = (draw[idx] - prev) / np.maximum(full[st, idx] - prev, 1e-12)
        conv_t = (grid[st] + frac * dt).clip(0.0, sc.days - 1e-6)
        conv_of = np.full(n, np.inf)
        conv_of[idx] = conv_t
        cc.append(idx + lo)
        ct.append(conv_t)
        for ci, ch in enumerate(sc.channels):
            who, times = touches[ci]
            if ch.intent_touch > 0:
                lucky = idx[rng.random(idx.shape[0]) < ch.intent_touch]
                before = conv_of[lucky] - rng.exponential(1.0 / 48.0, lucky.shape[0])
                who = np.concatenate([who, lucky])
                times = np.concatenate([times, before.clip(0.0, None)])
            tc.append(who + lo)
            tt.append(times)
            tch.append(np.full(who.shape[0], ci, dtype=np.int64))
    conv_customer = np.concatenate(cc)
    return SimResult(
        scenario=sc,
        n_customers=customers,
        touch_customer=np.concatenate(tc),
        touch_ms=(EPOCH_MS + np.concatenate(tt) * DAY_MS).astype(np.int64),
        touch_channel=np.concatenate(tch),
        conv_customer=conv_customer,
        conv_ms=(EPOCH_MS + np.concatenate(ct) * DAY_MS).astype(np.int64),
        conv_value=np.round(rng.gamma(2.0, 40.0, conv_customer.shape[0]), 2),
        holdout=holdout,
        truth=_shapley_truth(names, effective, coalition),
        removal={c: float(t) for c, t in zip(names, removal, strict=True)},
        baseline=baseline,
        expected=expected,
        first_seen_ms=(EPOCH_MS + np.concatenate(arrived) * DAY_MS).astype(np.int64)
        if sc.arrivals > 0
        else None,
    )


def _shapley_truth(
    names: Sequence[str], effective: Sequence[int], value: npt.NDArray[np.float64]
) -> dict[str, float]:
    """Exact Shapley values of the expected-conversions game over effective channels."""
    from math import factorial

    n = len(effective)
    out = dict.fromkeys(names, 0.0)
    for i, ci in enumerate(effective):
        total = 0.0
        for m in range(1 << n):
            if m >> i & 1:
                continue
            size = bin(m).count("1")
            weight = factorial(size) * factorial(n - size - 1) / factorial(n)
            total += weight * (value[m | 1 << i] - value[m])
        out[names[ci]] = float(total)
    return out


def _iso(ms: npt.NDArray[np.int64]) -> list[str]:
    return cast(list[str], np.datetime_as_string(ms.astype("datetime64[ms]"), unit="s").tolist())


def write_files(result: SimResult, out_dir: Path) -> dict[str, Path]:
    """Write ``T.csv``, ``C.csv``, ``truth.csv`` (and ``holdouts.csv``, ``customers.csv`` if any) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.lexsort((result.touch_ms, result.touch_customer))
    names = np.array(result.channels)
    paths = {
        "touchpoints": out_dir / "T.csv",
        "conversions": out_dir / "C.csv",
        "truth": out_dir / "truth.csv",
    }
    with paths["touchpoints"].open("w", newline="") as f:
        f.write("customer_id,ts,channel\n")
        ids = ("c" + result.touch_customer[order].astype(str).astype(object)).tolist()
        f.writelines(
            f"{i},{t},{c}\n"
            for i, t, c in zip(
                ids, _iso(result.touch_ms[order]), names[result.touch_channel[order]], strict=True
            )
        )
    with paths["conversions"].open("w", newline="") as f:
        f.write("customer_id,ts,value\n")
        f.writelines(
            f"c{i},{t},{v}\n"
            for i, t, v in zip(
                result.conv_customer.tolist(), _iso(result.conv_ms), result.conv_value.tolist(), strict=True
            )
        )
    with paths["truth"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["channel", "incremental", "removal"])
        for c, v in result.truth.items():
            w.writerow([c, f"{v:.3f}", f"{result.removal[c]:.3f}"])
        w.writerow(["(baseline)", f"{result.baseline:.3f}", ""])
    if result.first_seen_ms is not None:
        paths["customers"] = out_dir / "customers.csv"
        with paths["customers"].open("w", newline="") as f:
            f.write("customer_id,first_seen\n")
            f.writelines(f"c{i},{t}\n" for i, t in enumerate(_iso(result.first_seen_ms)))
    if result.holdout:
        paths["holdouts"] = out_dir / "holdouts.csv"
        with paths["holdouts"].open("w", newline="") as f:
            f.write("customer_id,channel,group\n")
            for channel, held in result.holdout.items():
                f.writelines(
                    f"c{i},{channel},{'holdout' if h else 'treatment'}\n" for i, h in enumerate(held.tolist())
                )
    return paths
