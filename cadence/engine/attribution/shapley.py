"""Shapley models from coalition tallies.

``shapley``: the channels of a journey form a coalition ``S`` (a bit mask); the tally
keeps, per coalition, how many journeys had exactly those channels and how many
converted. The value of a coalition is its conversion rate (a coalition never seen
is worth the best rate of a seen sub-coalition; the empty one is worth 0). Each
journey's conversion is split over its channels by their Shapley values in the game
restricted to ``S``, computed exactly for every coalition at once from the Harsanyi
dividends (a Moebius transform over the 2^k masks, k <= 15 channels).

``shapley_ordered``: channels join in the order the journey met them; each distinct
channel earns its marginal conversion rate over *prefix* tallies (journeys whose
ordered distinct channels start with that prefix), negative margins clipped.

Tallies are plain counters, so they can be kept per event (see
:class:`CoalitionTally`); the credits are recomputed from them on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cadence.engine.attribution.heuristics import distinct_pairs
from cadence.engine.attribution.journeys import AttributionError, FloatArray, IntArray, Journeys

__all__ = [
    "MAX_EXACT_CHANNELS",
    "CoalitionTally",
    "coalition_masks",
    "coalition_shares",
    "shapley",
    "shapley_ordered",
]

#: Exact Shapley over 2^k coalitions up to this many channels.
MAX_EXACT_CHANNELS = 15


@dataclass
class CoalitionTally:
    """Journeys and conversions per channel coalition (bit mask), kept per event.

    >>> t = CoalitionTally(); t.add(0b01, converted=True); t.add(0b01, converted=False)
    >>> t.add(0b11, converted=True); t.journeys, t.conversions
    ({1: 2, 3: 1}, {1: 1, 3: 1})
    """

    journeys: dict[int, int] = field(default_factory=dict)
    conversions: dict[int, int] = field(default_factory=dict)

    def add(self, mask: int, *, converted: bool, count: int = 1) -> None:
        """Count ``count`` journeys with coalition ``mask`` (and conversions if ``converted``)."""
        self.journeys[mask] = self.journeys.get(mask, 0) + count
        if converted:
            self.conversions[mask] = self.conversions.get(mask, 0) + count


def coalition_masks(journeys: Journeys) -> IntArray:
    """Per journey: the bit mask of its distinct channels.

    >>> coalition_masks(Journeys.from_paths([["a", "c", "a"], ["b"], []], converted=[1, 0, 1])).tolist()
    [5, 2, 0]
    """
    k = len(journeys.channels)
    if k > 62:
        raise AttributionError(f"coalitions need at most 62 channels, got {k}")
    masks = np.zeros(journeys.n_journeys, dtype=np.int64)
    if journeys.n_touches:
        _, pair_journey, pair_channel, _ = distinct_pairs(journeys)
        np.bitwise_or.at(masks, pair_journey, np.left_shift(1, pair_channel))
    return masks


def _zeta(values: FloatArray, k: int, *, inverse: bool = False, op: str = "sum") -> FloatArray:
    """Subset-sum (zeta), its inverse (Moebius), or subset-max over the last axis of 2^k."""
    out = values.copy()
    lead = out.shape[:-1]
    for bit in range(k):
        view = out.reshape(*lead, -1, 2, 1 << bit)
        if op == "max":
            np.maximum(view[..., 1, :], view[..., 0, :], out=view[..., 1, :])
        elif inverse:
            view[..., 1, :] -= view[..., 0, :]
        else:
            view[..., 1, :] += view[..., 0, :]
    return out


def coalition_shares(
    journeys_by_mask: dict[int, int], conversions_by_mask: dict[int, int], k: int
) -> FloatArray:
    """Per coalition mask (rows, 2^k) and channel (columns): that channel's share of
    the coalition's conversions (rows sum to 1 where the coalition has any value).

    >>> s = coalition_shares({1: 10, 2: 10, 3: 10}, {1: 1, 2: 3, 3: 6}, 2)
    >>> [round(x, 3) for x in s[3].tolist()]
    [0.333, 0.667]
    """
    if k > MAX_EXACT_CHANNELS:
        raise AttributionError(
            f"exact Shapley handles at most {MAX_EXACT_CHANNELS} channels, got {k}: "
            "group channels (channel rules) or use shapley_simplified"
        )
    size = 1 << k
    seen = np.zeros(size, dtype=bool)
    rate = np.zeros(size)
    for mask, n in journeys_by_mask.items():
        if n > 0 and mask > 0:
            seen[mask] = True
            rate[mask] = conversions_by_mask.get(mask, 0) / n
    closure = _zeta(rate, k, op="max")
    value = np.where(seen, rate, closure)
    value[0] = 0.0
    dividends = _zeta(value, k, inverse=True)
    popcount = np.array([bin(m).count("1") for m in range(size)], dtype=np.float64)
    per_member = np.divide(dividends, popcount, out=np.zeros(size), where=popcount > 0)
    members = (np.arange(size)[None, :] >> np.arange(k)[:, None]) & 1
    phi = _zeta(per_member[None, :] * members, k).T  # (2^k, k): Shapley of i in game on S
    phi = np.clip(phi, 0.0, None) * members.T
    totals = phi.sum(axis=1, keepdims=True)
    # Where every member's value is <= 0, fall back to an equal split.
    equal = members.T / np.maximum(popcount[:, None], 1.0)
    return np.where(totals > 0, phi / np.where(totals > 0, totals, 1.0), equal)


def _spread(
    journeys: Journeys, share_of_pair: FloatArray, inverse: IntArray, touches: IntArray
) -> FloatArray:
    """Per touch credit: the (journey, channel) pair's share over its touches."""
    return (share_of_pair / touches)[inverse]


def shapley(journeys: Journeys) -> FloatArray:
    """Shapley values with a conversion-rate value function over channel coalitions.

    >>> j = Journeys.from_paths([["a"], ["a"], ["b"], ["b"], ["a", "b"], ["a", "b"]],
    ...     converted=[1, 0, 0, 0, 1, 1])
    >>> [round(x, 3) for x in shapley(j).tolist()[4:6]]
    [0.75, 0.25]
    """
    if journeys.n_touches == 0:
        return np.zeros(0)
    k = len(journeys.channels)
    masks = coalition_masks(journeys)
    tally = CoalitionTally()
    uniq, counts = np.unique(masks, return_counts=True)
    conv_uniq, conv_counts = np.unique(masks[journeys.converted > 0], return_counts=True)
    tally.journeys = {int(m): int(c) for m, c in zip(uniq, counts, strict=True)}
    tally.conversions = {int(m): int(c) for m, c in zip(conv_uniq, conv_counts, strict=True)}
    shares = coalition_shares(tally.journeys, tally.conversions, k)
    inverse, pair_journey, pair_channel, pair_touches = distinct_pairs(journeys)
    pair_share = shares[masks[pair_journey], pair_channel] * journeys.converted[pair_journey]
    return _spread(journeys, pair_share, inverse, pair_touches)


def shapley_ordered(journeys: Journeys) -> FloatArray:
    """Ordered Shapley: channels enter in journey order; each earns its marginal
    conversion rate over prefix tallies (clipped at 0, normalised per journey).

    >>> j = Journeys.from_paths([["a"], ["a"], ["a", "b"], ["a", "b"]], converted=[0, 1, 1, 1])
    >>> [round(x, 3) for x in shapley_ordered(j).tolist()[4:]]
    [0.75, 0.25]
    """
    if journeys.n_touches == 0:
        return np.zeros(0)
    inverse, pair_journey, pair_channel, pair_touches = distinct_pairs(journeys)
    # Order pairs by their first touch, inside each journey.
    first_touch = np.full(pair_journey.shape[0], journeys.n_touches, dtype=np.int64)
    np.minimum.at(first_touch, inverse, np.arange(journeys.n_touches, dtype=np.int64))
    order = np.lexsort((first_touch, pair_journey))
    pj, pc = pair_journey[order], pair_channel[order]
    starts = np.flatnonzero(np.r_[True, pj[1:] != pj[:-1]])
    rank = np.arange(pj.shape[0]) - np.repeat(starts, np.diff(np.r_[starts, pj.shape[0]]))
    # Prefix hashes (wrapping uint64 arithmetic; collisions are astronomically unlikely).
    prefix = np.zeros(pj.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        mult = np.uint64(1_000_003)
        max_rank = int(rank.max()) if rank.size else 0
        for r in range(max_rank + 1):
            at = rank == r
            prev = np.zeros(int(at.sum()), dtype=np.uint64) if r == 0 else prefix[np.flatnonzero(at) - 1]
            prefix[at] = prev * mult + pc[at].astype(np.uint64) + np.uint64(1)
    uniq, inv, n = np.unique(prefix, return_inverse=True, return_counts=True)
    conv = np.bincount(inv, weights=journeys.converted[pj], minlength=uniq.shape[0])
    rate = conv / n
    own = rate[inv]
    before = np.where(rank == 0, 0.0, np.r_[0.0, own[:-1]])
    margin = np.clip(own - before, 0.0, None)
    total = np.bincount(pj, weights=margin, minlength=journeys.n_journeys)
    n_distinct = np.bincount(pj, minlength=journeys.n_journeys)
    share = np.where(total[pj] > 0, margin / np.where(total[pj] > 0, total[pj], 1.0), 1.0 / n_distinct[pj])
    share *= journeys.converted[pj]
    pair_share = np.empty_like(share)
    pair_share[order] = share
    return _spread(journeys, pair_share, inverse, pair_touches)
