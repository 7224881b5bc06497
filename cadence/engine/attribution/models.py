"""Every model by name, and custom credit rules applied to any of them.

:func:`run_model` runs one model (a name from :data:`MODELS`) over a touch log's
journeys and returns a :class:`ModelResult`: per-touch credit, which sums by channel
to credited conversions (or value). Credit rules (:class:`CreditRule`) apply to any
model: ``exclude`` drops a channel's touches before the model runs; ``fixed`` gives
the channel exactly that share of each conversion it touched (0 removes it and
re-spreads its credit over the other channels); ``weight`` multiplies its credit
before renormalising. A rule's ``when`` predicate sees the journey's touches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cadence.engine.attribution import heuristics, markov, shapley
from cadence.engine.attribution.causal import CausalFit, causal
from cadence.engine.attribution.journeys import (
    DAY_MS,
    AttributionError,
    FloatArray,
    IntArray,
    Journeys,
    TouchLog,
)
from cadence.engine.attribution.spec import MODELS, CreditRule, Touch

__all__ = ["MODELS", "ModelResult", "apply_credit_rules", "exclude_touches", "parse_models", "run_model"]


@dataclass
class ModelResult:
    """One model's credit over a set of journeys."""

    model: str
    journeys: Journeys
    touch_credit: FloatArray
    causal: CausalFit | None = None

    def by_channel(self, *, value: bool = False) -> dict[str, float]:
        """Credited conversions (or value) per channel."""
        return heuristics.channel_totals(self.journeys, self.touch_credit, value=value)

    def on_customers(self, customers: IntArray, *, n_customers: int) -> dict[str, float]:
        """Credited conversions per channel, counting only the given customers."""
        inside = np.zeros(n_customers + 1, dtype=bool)
        inside[customers[customers < n_customers]] = True
        touch_customer = self.journeys.customer[self.journeys.touch_journey]
        weights = np.where(inside[touch_customer], self.touch_credit, 0.0)
        sums = np.bincount(
            self.journeys.touch_channel, weights=weights, minlength=len(self.journeys.channels)
        )
        return {c: float(s) for c, s in zip(self.journeys.channels, sums, strict=True)}


def parse_models(values: Sequence[str]) -> list[str]:
    """Model names from repeated and comma-separated options, checked, in order.

    >>> parse_models(["markov,linear", "causal", "linear"])
    ['markov', 'linear', 'causal']
    >>> parse_models(["lineer"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cadence.engine.attribution.journeys.AttributionError: unknown model 'lineer' (choose from ...)
    """
    out: list[str] = []
    for value in values:
        for name in (v.strip() for v in value.split(",")):
            if not name:
                continue
            if name not in MODELS:
                raise AttributionError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
            if name not in out:
                out.append(name)
    return out


def _journey_touches(journeys: Journeys, j: int) -> list[Touch]:
    lo, hi = int(journeys.start[j]), int(journeys.start[j + 1])
    names = journeys.channels
    return [
        Touch(ts_ms=int(journeys.touch_ms[i]), channel=names[int(journeys.touch_channel[i])])
        for i in range(lo, hi)
    ]


def _rule_journeys(journeys: Journeys, rule: CreditRule) -> IntArray:
    """Journeys (containing the rule's channel) where the rule's condition holds."""
    if rule.channel not in journeys.channels:
        return np.zeros(0, dtype=np.int64)
    code = journeys.channels.index(rule.channel)
    touched = np.unique(journeys.touch_journey[journeys.touch_channel == code])
    if rule.when is None:
        return touched
    return np.array([j for j in touched.tolist() if rule.when(_journey_touches(journeys, j))], dtype=np.int64)


def exclude_touches(journeys: Journeys, rules: Sequence[CreditRule]) -> Journeys:
    """Drop the touches that ``exclude`` rules remove.

    >>> j = Journeys.from_paths([["a", "b", "a"], ["b"]], converted=[1, 0])
    >>> exclude_touches(j, [CreditRule(channel="a", action="exclude")]).paths()
    [['b'], ['b']]
    """
    drop = np.zeros(journeys.n_touches, dtype=bool)
    for rule in rules:
        if rule.action != "exclude" or rule.channel not in journeys.channels:
            continue
        code = journeys.channels.index(rule.channel)
        in_rule = np.zeros(journeys.n_journeys, dtype=bool)
        in_rule[_rule_journeys(journeys, rule)] = True
        drop |= (journeys.touch_channel == code) & in_rule[journeys.touch_journey]
    if not drop.any():
        return journeys
    keep = ~drop
    counts = np.bincount(journeys.touch_journey[keep], minlength=journeys.n_journeys)
    start = np.zeros(journeys.n_journeys + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    return Journeys(
        channels=journeys.channels,
        start=start,
        converted=journeys.converted,
        value=journeys.value,
        end_ms=journeys.end_ms,
        customer=journeys.customer,
        touch_channel=journeys.touch_channel[keep],
        touch_ms=journeys.touch_ms[keep],
        touch_journey=journeys.touch_journey[keep],
        customer_ids=journeys.customer_ids,
    )


def apply_credit_rules(journeys: Journeys, credit: FloatArray, rules: Sequence[CreditRule]) -> FloatArray:
    """Apply ``fixed`` and ``weight`` rules to per-touch credit, journey by journey,
    keeping each journey's total.

    >>> j = Journeys.from_paths([["a", "b"]], converted=[1])
    >>> zero_a = CreditRule("a", action="fixed", value=0.0)
    >>> triple_a = CreditRule("a", action="weight", value=3.0)
    >>> apply_credit_rules(j, heuristics.linear(j), [zero_a]).tolist()
    [0.0, 1.0]
    >>> apply_credit_rules(j, heuristics.linear(j), [triple_a]).tolist()
    [0.75, 0.25]
    """
    credit = credit.copy()
    tj = journeys.touch_journey
    for rule in rules:
        if rule.action == "exclude" or rule.channel not in journeys.channels:
            continue
        code = journeys.channels.index(rule.channel)
        hit = np.zeros(journeys.n_journeys, dtype=bool)
        hit[_rule_journeys(journeys, rule)] = True
        total = np.bincount(tj, weights=credit, minlength=journeys.n_journeys)
        is_ch = journeys.touch_channel == code
        mine = np.bincount(tj, weights=np.where(is_ch, credit, 0.0), minlength=journeys.n_journeys)
        if rule.action == "weight":
            target = mine * rule.value
            others = total - mine
            new_total = target + others
            scale = np.divide(total, new_total, out=np.ones_like(total), where=new_total > 0)
            mine_target = target * scale
        else:  # fixed: the channel gets exactly `value` of the conversion
            mine_target = np.minimum(rule.value * journeys.converted, total)
        n_mine = np.bincount(tj, weights=is_ch.astype(np.float64), minlength=journeys.n_journeys)
        others = total - mine
        rest = total - mine_target
        other_scale = np.divide(rest, others, out=np.zeros_like(rest), where=others > 0)
        mine_scale = np.divide(mine_target, mine, out=np.zeros_like(mine), where=mine > 0)
        # If the channel had no credit yet, spread its fixed share evenly over its touches.
        even = np.divide(mine_target, n_mine, out=np.zeros_like(mine), where=(mine <= 0) & (n_mine > 0))
        new = np.where(is_ch, credit * mine_scale[tj] + even[tj], credit * other_scale[tj])
        credit = np.where(hit[tj], new, credit)
    return credit


ModelFn = Callable[[Journeys, Mapping[str, Any]], FloatArray]

_SIMPLE: dict[str, ModelFn] = {
    "first_touch": lambda j, p: heuristics.first_touch(j),
    "last_touch": lambda j, p: heuristics.last_touch(j),
    "last_non_direct": lambda j, p: heuristics.last_non_direct(j),
    "linear": lambda j, p: heuristics.linear(j),
    "time_decay": lambda j, p: heuristics.time_decay(j, half_life_ms=int(p.get("half_life_ms", 7 * DAY_MS))),
    "position": lambda j, p: heuristics.position(
        j, first=float(p.get("first", 0.4)), last=float(p.get("last", 0.4))
    ),
    "shapley_simplified": lambda j, p: heuristics.shapley_simplified(j),
    "shapley": lambda j, p: shapley.shapley(j),
    "shapley_ordered": lambda j, p: shapley.shapley_ordered(j),
    "markov": lambda j, p: markov.markov(j, order=int(p.get("order", 1))),
}


def _excluded_log(log: TouchLog, rules: Sequence[CreditRule]) -> TouchLog:
    """The log without channels excluded unconditionally (the causal model's input)."""
    gone = [
        log.channels.index(r.channel)
        for r in rules
        if r.action == "exclude" and r.when is None and r.channel in log.channels
    ]
    if not gone:
        return log
    keep = ~np.isin(log.touch_channel, gone)
    return TouchLog(
        channels=log.channels,
        customer_ids=log.customer_ids,
        touch_customer=log.touch_customer[keep],
        touch_ms=log.touch_ms[keep],
        touch_channel=log.touch_channel[keep],
        conv_customer=log.conv_customer,
        conv_ms=log.conv_ms,
        conv_value=log.conv_value,
    )


def run_model(
    name: str,
    *,
    log: TouchLog,
    journeys: Journeys,
    window_ms: int,
    params: Mapping[str, Any] | None = None,
    credit_rules: Sequence[CreditRule] = (),
    causal_fit: CausalFit | None = None,
    calibration: Mapping[str, float] | None = None,
) -> ModelResult:
    """Run model ``name`` (with its ``params``) and the credit rules.

    Params: ``half_life_ms`` (time_decay), ``first``/``last`` (position), ``order``
    (markov, 1-3), ``interactions`` (causal, default True), ``min_lag_ms`` (causal,
    how long after a touch it starts to act; default 1 h, 0 for date-only data).
    """
    params = params or {}
    journeys = exclude_touches(journeys, credit_rules)
    fit: CausalFit | None = None
    if name == "causal":
        credit, fit = causal(
            _excluded_log(log, credit_rules),
            journeys,
            window_ms=window_ms,
            interactions=bool(params.get("interactions", True)),
            min_lag_ms=None if params.get("min_lag_ms") is None else int(params["min_lag_ms"]),
            calibration=calibration,
            fit=causal_fit,
        )
    elif name in _SIMPLE:
        credit = _SIMPLE[name](journeys, params)
    else:
        raise AttributionError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    if any(r.action != "exclude" for r in credit_rules):
        credit = apply_credit_rules(journeys, credit, credit_rules)
    return ModelResult(model=name, journeys=journeys, touch_credit=credit, causal=fit)
