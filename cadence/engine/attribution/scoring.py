"""Scoring a model's credit against known truth (from the simulator).

Two numbers per model: the Pearson correlation between its per-channel credit and
the true per-channel incremental conversions, and the share of its credit that went
to *wrong* channels, those whose true incremental conversions are (nearly) zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Score", "score"]


@dataclass(frozen=True)
class Score:
    """How close one model's credit is to the truth."""

    pearson: float
    wrong_share: float


def score(credit: Mapping[str, float], truth: Mapping[str, float], *, zero_below: float = 0.01) -> Score:
    """Pearson r over the truth's channels and the share of credit on wrong channels.

    A channel is wrong when its true incremental conversions are below ``zero_below``
    of the total; channels missing from ``credit`` count as 0.

    >>> s = score({"a": 10, "b": 5, "c": 5}, {"a": 12, "b": 6, "c": 0})
    >>> round(s.pearson, 3), s.wrong_share
    (0.866, 0.25)
    """
    channels = sorted(truth)
    x = [float(credit.get(c, 0.0)) for c in channels]
    y = [float(truth[c]) for c in channels]
    n = len(channels)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    r = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
    total_truth = sum(max(v, 0.0) for v in y)
    wrong = {c for c in channels if truth[c] < zero_below * total_truth}
    total = sum(max(v, 0.0) for v in credit.values())
    wrong_credit = sum(max(float(v), 0.0) for c, v in credit.items() if c in wrong)
    return Score(pearson=r, wrong_share=wrong_credit / total if total > 0 else 0.0)
