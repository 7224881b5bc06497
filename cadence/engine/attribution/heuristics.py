"""Rule-based models: each gives every touch of a converting journey its share.

Every model here returns a per-touch credit array aligned with
:attr:`Journeys.touch_channel`: the shares of one converting journey sum to 1, and
touches of open (non-converting) journeys get 0. :func:`channel_totals` sums them by
channel. All are vectorised over the whole set of journeys.
"""

from __future__ import annotations

import numpy as np

from cadence.engine.attribution.journeys import DAY_MS, FloatArray, IntArray, Journeys

__all__ = [
    "DIRECT_CHANNELS",
    "channel_totals",
    "first_touch",
    "last_non_direct",
    "last_touch",
    "linear",
    "position",
    "shapley_simplified",
    "time_decay",
]

#: Channel names (lower case) that ``last_non_direct`` skips.
DIRECT_CHANNELS = frozenset({"direct", "(direct)", "direct/none", "(direct) / (none)", "none"})


def channel_totals(journeys: Journeys, credit: FloatArray, *, value: bool = False) -> dict[str, float]:
    """Sum per-touch credit by channel (conversions, or conversion value with ``value``).

    >>> j = Journeys.from_paths([["a", "b"], ["b"]], converted=[1, 1], value=[10, 4])
    >>> channel_totals(j, linear(j)), channel_totals(j, linear(j), value=True)
    ({'a': 0.5, 'b': 1.5}, {'a': 5.0, 'b': 9.0})
    """
    weights = credit * journeys.value[journeys.touch_journey] if value else credit
    sums = np.bincount(journeys.touch_channel, weights=weights, minlength=len(journeys.channels))
    return {c: float(s) for c, s in zip(journeys.channels, sums, strict=True)}


def _ends(journeys: Journeys) -> tuple[IntArray, IntArray]:
    """First and last touch index of every converting journey that has touches."""
    nonempty = (journeys.length > 0) & (journeys.converted > 0)
    js = np.flatnonzero(nonempty)
    return journeys.start[js], journeys.start[js + 1] - 1


def _conv(journeys: Journeys) -> FloatArray:
    """Per touch: 1.0 if its journey converted."""
    return journeys.converted[journeys.touch_journey]


def first_touch(journeys: Journeys) -> FloatArray:
    """All credit to the first touch of each converting journey.

    >>> j = Journeys.from_paths([["a", "b", "c"], ["b"]], converted=[1, 0])
    >>> first_touch(j).tolist()
    [1.0, 0.0, 0.0, 0.0]
    """
    credit = np.zeros(journeys.n_touches)
    first, _ = _ends(journeys)
    credit[first] = 1.0
    return credit


def last_touch(journeys: Journeys) -> FloatArray:
    """All credit to the last touch before each conversion.

    >>> j = Journeys.from_paths([["a", "b", "c"], ["b"]], converted=[1, 1])
    >>> last_touch(j).tolist()
    [0.0, 0.0, 1.0, 1.0]
    """
    credit = np.zeros(journeys.n_touches)
    _, last = _ends(journeys)
    credit[last] = 1.0
    return credit


def last_non_direct(journeys: Journeys, *, direct: frozenset[str] = DIRECT_CHANNELS) -> FloatArray:
    """All credit to the last touch that is not direct; to the last touch if all are.

    >>> j = Journeys.from_paths([["email", "direct"], ["direct"]], converted=[1, 1])
    >>> last_non_direct(j).tolist()
    [1.0, 0.0, 1.0]
    """
    is_direct = np.array([c.lower() in direct for c in journeys.channels] + [False], dtype=bool)
    credit = last_touch(journeys)
    candidates = np.flatnonzero(~is_direct[journeys.touch_channel] & (_conv(journeys) > 0))
    if candidates.size == 0:
        return credit
    cj = journeys.touch_journey[candidates]
    last_candidate = candidates[np.append(cj[1:] != cj[:-1], True)]
    credit[journeys.start[journeys.touch_journey[last_candidate] + 1] - 1] = 0.0
    credit[last_candidate] = 1.0
    return credit


def linear(journeys: Journeys) -> FloatArray:
    """Equal credit to every touch of a converting journey.

    >>> j = Journeys.from_paths([["a", "b", "a", "c"]], converted=[1])
    >>> linear(j).tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    length = journeys.length[journeys.touch_journey].astype(np.float64)
    return _conv(journeys) / np.maximum(length, 1.0)


def time_decay(journeys: Journeys, *, half_life_ms: int = 7 * DAY_MS) -> FloatArray:
    """Credit halving every ``half_life_ms`` before the conversion (default 7 days).

    >>> j = Journeys.from_paths([["a", "b"]], converted=[1], gaps_ms=[[7 * DAY_MS, 0]])
    >>> [round(x, 4) for x in time_decay(j).tolist()]
    [0.3333, 0.6667]
    """
    if half_life_ms <= 0:
        raise ValueError("half_life_ms must be positive")
    age = (journeys.end_ms[journeys.touch_journey] - journeys.touch_ms).astype(np.float64)
    weight = np.exp2(-age / half_life_ms) * _conv(journeys)
    sums = np.bincount(journeys.touch_journey, weights=weight, minlength=journeys.n_journeys)
    denom = sums[journeys.touch_journey]
    return np.divide(weight, denom, out=np.zeros_like(weight), where=denom > 0)


def position(journeys: Journeys, *, first: float = 0.4, last: float = 0.4) -> FloatArray:
    """Position based (U-shaped): ``first`` and ``last`` to the ends, the rest spread
    over the middle; one touch gets all, two touches split evenly.

    >>> j = Journeys.from_paths([["a", "b", "c", "d"], ["a", "b"]], converted=[1, 1])
    >>> [round(x, 3) for x in position(j).tolist()]
    [0.4, 0.1, 0.1, 0.4, 0.5, 0.5]
    >>> [round(x, 3) for x in position(j, first=0.3, last=0.5).tolist()[:4]]
    [0.3, 0.1, 0.1, 0.5]
    """
    if first < 0 or last < 0 or first + last > 1:
        raise ValueError("position weights must be >= 0 and first + last <= 1")
    n = journeys.length[journeys.touch_journey].astype(np.float64)
    pos = journeys.position()
    middle = (1.0 - first - last) / np.maximum(n - 2, 1.0)
    credit = np.where(pos == 0, first, np.where(pos == n - 1, last, middle))
    # Short journeys: one touch takes everything, two share first+last+middle evenly.
    credit = np.where(n == 1, 1.0, np.where(n == 2, 0.5, credit))
    return credit * _conv(journeys)


def distinct_pairs(journeys: Journeys) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """(journey, channel) pairs: per touch its pair index; per pair journey, channel, touches."""
    k = len(journeys.channels)
    key = journeys.touch_journey * k + journeys.touch_channel
    # Touches are sorted by journey, so sorting within equal journeys is cheap.
    uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    return inverse.astype(np.int64), uniq // k, uniq % k, counts.astype(np.int64)


def shapley_simplified(journeys: Journeys) -> FloatArray:
    """Zhao et al.'s simplified Shapley: a conversion split equally over the journey's
    distinct channels (then evenly over each channel's touches).

    >>> j = Journeys.from_paths([["a", "b", "a"]], converted=[1])
    >>> shapley_simplified(j).tolist()
    [0.25, 0.5, 0.25]
    """
    if journeys.n_touches == 0:
        return np.zeros(0)
    inverse, pair_journey, _, pair_touches = distinct_pairs(journeys)
    n_distinct = np.bincount(pair_journey, minlength=journeys.n_journeys)
    share = journeys.converted[pair_journey] / n_distinct[pair_journey] / pair_touches
    return share[inverse]
