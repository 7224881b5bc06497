"""Measured incremental lift from randomised holdouts, and calibration to it.

A campaign with a holdout arm withholds a channel from a random share of customers.
The difference in conversion rate between the treated and the held-out customers is
an unbiased estimate of what the channel caused among the treated; with the size of
the treated group it is a number of incremental conversions, with a confidence
interval (Newcombe's hybrid score interval for the difference of two independent
proportions).

Observational models can be compared with it on the same customers, and the causal
model's credit for the channel can be scaled to match it (:func:`calibration_factors`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from cadence.engine.attribution.files import Holdouts
from cadence.engine.attribution.journeys import TouchLog

__all__ = ["Lift", "calibration_factors", "lift", "measure_lifts"]


@dataclass(frozen=True)
class Lift:
    """Measured lift of one channel's holdout experiment."""

    channel: str
    treated: int
    held_out: int
    treated_rate: float
    held_out_rate: float
    difference: float  # treated_rate - held_out_rate
    low: float  # confidence interval of the difference
    high: float

    @property
    def incremental(self) -> float:
        """Incremental conversions among the treated."""
        return self.difference * self.treated

    @property
    def incremental_interval(self) -> tuple[float, float]:
        """Confidence interval of :attr:`incremental`."""
        return self.low * self.treated, self.high * self.treated

    @property
    def relative(self) -> float | None:
        """Lift relative to the held-out rate (None if that rate is 0)."""
        return self.difference / self.held_out_rate if self.held_out_rate else None


def lift(
    channel: str,
    *,
    treated: int,
    treated_conv: int,
    held_out: int,
    held_out_conv: int,
    confidence: float = 0.95,
) -> Lift:
    """Difference of conversion rates of two independent groups, with its confidence interval.

    The interval is Newcombe's (hybrid score, from each rate's Wilson interval): the
    plain normal approximation shrinks to nothing at a rate of 0% or 100%, so a handful
    of customers who all converted would read as a certain lift. With large groups the
    two agree.

    >>> l = lift("email", treated=10_000, treated_conv=1_200, held_out=10_000, held_out_conv=1_000)
    >>> round(l.difference, 4), round(l.low, 4), round(l.high, 4), round(l.incremental)
    (0.02, 0.0113, 0.0287, 200)
    >>> l = lift("email", treated=31, treated_conv=31, held_out=29, held_out_conv=29)
    >>> round(l.difference, 3), round(l.low, 3), round(l.high, 3)
    (0.0, -0.11, 0.117)
    >>> l = lift("email", treated=70, treated_conv=56, held_out=80, held_out_conv=48)  # Newcombe (1998)
    >>> round(l.low, 4), round(l.high, 4)
    (0.0524, 0.3339)
    """
    if treated <= 0 or held_out <= 0:
        raise ValueError("both arms need customers")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p_t, p_h = treated_conv / treated, held_out_conv / held_out
    low_t, high_t = _wilson(p_t, treated, z)
    low_h, high_h = _wilson(p_h, held_out, z)
    d = p_t - p_h
    low = d - math.sqrt((p_t - low_t) ** 2 + (high_h - p_h) ** 2)
    high = d + math.sqrt((high_t - p_t) ** 2 + (p_h - low_h) ** 2)
    return Lift(channel, treated, held_out, p_t, p_h, d, low, high)


def _wilson(p: float, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed in ``n`` trials."""
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def measure_lifts(log: TouchLog, holdouts: Holdouts, *, confidence: float = 0.95) -> dict[str, Lift]:
    """Per channel with an experiment: its measured lift (a customer converts if they
    have any conversion in the conversions file)."""
    size = log.n_customers + max(
        (int(c.max()) + 1 - log.n_customers for c in holdouts.customers.values() if c.size), default=0
    )
    converted = np.zeros(max(size, log.n_customers), dtype=bool)
    converted[log.conv_customer] = True
    out: dict[str, Lift] = {}
    for channel, customers in holdouts.customers.items():
        held = holdouts.held_out[channel]
        conv = converted[customers]
        n_h = int(held.sum())
        n_t = int((~held).sum())
        if n_h == 0 or n_t == 0:
            continue
        out[channel] = lift(
            channel,
            treated=n_t,
            treated_conv=int(conv[~held].sum()),
            held_out=n_h,
            held_out_conv=int(conv[held].sum()),
            confidence=confidence,
        )
    return out


def calibration_factors(
    lifts: Mapping[str, Lift], model_on_treated: Mapping[str, float], *, max_factor: float = 20.0
) -> dict[str, float]:
    """Per channel: measured incremental / model's estimate on the same treated customers.

    A measured lift whose interval includes 0 still calibrates (to its point estimate,
    floored at 0); a channel the model gives nothing is left alone.

    >>> l = lift("display", treated=9_000, treated_conv=990, held_out=1_000, held_out_conv=100)
    >>> {c: round(f, 3) for c, f in calibration_factors({"display": l}, {"display": 450.0}).items()}
    {'display': 0.2}
    """
    out: dict[str, float] = {}
    for channel, measured in lifts.items():
        model = model_on_treated.get(channel, 0.0)
        if model > 0:
            out[channel] = float(min(max(measured.incremental, 0.0) / model, max_factor))
    return out
