"""Journeys in columns: every customer's touches cut into converting and open paths.

A *journey* is the touches that lead to one conversion: the customer's touches at or
before the conversion, after their previous conversion, and no older than the window.
Touches after a customer's last conversion form one more, *open* journey (it has not
converted, yet); so do all touches of a customer who never converted. A conversion
with no touch in its window is a journey with no touches: it still counts, it is
simply credited to no channel.

Everything is a numpy array, so the models are vectorised: ``touch_*`` arrays are
sorted by journey, then time; ``start[j]:start[j + 1]`` slices journey ``j``'s touches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from cadence.errors import CadenceError

__all__ = [
    "DAY_MS",
    "AttributionError",
    "Journeys",
    "TouchLog",
    "build_journeys",
    "parse_duration",
    "parse_window",
]

DAY_MS = 86_400_000

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class AttributionError(CadenceError):
    """Attribution input or parameters are wrong; the message says what and where."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": DAY_MS, "w": 7 * DAY_MS}


def parse_duration(text: str, *, default_unit: str = "d") -> int:
    """Milliseconds in ``"30d"``, ``"12h"``, ``"2w"`` or a bare number of ``default_unit``.

    >>> parse_duration("7d"), parse_duration("36h"), parse_duration("3")
    (604800000, 129600000, 259200000)
    """
    match = _DURATION.match(text)
    if not match:
        raise AttributionError(f"not a duration: {text!r} (use e.g. 30d, 12h, 2w)")
    return int(float(match.group(1)) * _UNIT_MS[match.group(2) or default_unit])


def parse_window(text: str) -> int:
    """An attribution window in milliseconds; windows run from 1 to 90 days.

    >>> parse_window("30d") // DAY_MS
    30
    >>> parse_window("120d")
    Traceback (most recent call last):
    ...
    cadence.engine.attribution.journeys.AttributionError: window 120d is outside 1d..90d
    """
    ms = parse_duration(text)
    if not DAY_MS <= ms <= 90 * DAY_MS:
        raise AttributionError(f"window {text.strip()} is outside 1d..90d")
    return ms


@dataclass(frozen=True, eq=False)
class Journeys:
    """Converting and open journeys in columns (see the module docstring)."""

    channels: tuple[str, ...]
    #: per journey: offsets into the touch arrays (length n_journeys + 1)
    start: IntArray
    #: per journey: 1.0 if it ends in a conversion, else 0.0
    converted: FloatArray
    #: per journey: the conversion's value (0 for open journeys)
    value: FloatArray
    #: per journey: conversion time (converting) or last touch time (open), ms
    end_ms: IntArray
    #: per journey: index of the customer it belongs to
    customer: IntArray
    #: per touch: channel code (index into ``channels``)
    touch_channel: IntArray
    #: per touch: time, ms
    touch_ms: IntArray
    #: per touch: the journey it belongs to
    touch_journey: IntArray
    #: customers' ids, in the order of ``customer`` codes
    customer_ids: Sequence[str] = field(default=())

    @property
    def n_journeys(self) -> int:
        """How many journeys, converting and open."""
        return int(self.converted.shape[0])

    @property
    def n_touches(self) -> int:
        """How many touches, over all journeys."""
        return int(self.touch_channel.shape[0])

    @property
    def length(self) -> IntArray:
        """Touches per journey."""
        return np.diff(self.start)

    def position(self) -> IntArray:
        """Per touch: its 0-based position inside its journey."""
        return np.arange(self.n_touches, dtype=np.int64) - self.start[self.touch_journey]

    def paths(self) -> list[list[str]]:
        """Every journey as a list of channel names (small inputs, tests and doctests).

        >>> Journeys.from_paths([["a", "b"], []], converted=[1, 1]).paths()
        [['a', 'b'], []]
        """
        names = self.channels
        out: list[list[str]] = []
        for j in range(self.n_journeys):
            codes = self.touch_channel[self.start[j] : self.start[j + 1]]
            out.append([names[int(c)] for c in codes])
        return out

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[Sequence[str]],
        *,
        converted: Sequence[float],
        value: Sequence[float] | None = None,
        gaps_ms: Sequence[Sequence[int]] | None = None,
    ) -> Journeys:
        """Journeys from channel paths (one customer each); for tests and doctests.

        ``gaps_ms[j][i]`` is how long before the journey's end touch ``i`` happened
        (default: one day per step from the end).

        >>> j = Journeys.from_paths([["email", "search"], ["email"]], converted=[1, 0])
        >>> j.channels, j.n_journeys, j.n_touches, j.length.tolist()
        (('email', 'search'), 2, 3, [2, 1])
        """
        channels = tuple(sorted({c for p in paths for c in p}))
        code = {c: i for i, c in enumerate(channels)}
        lengths = [len(p) for p in paths]
        start = np.zeros(len(paths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=start[1:])
        end = np.full(len(paths), 100 * DAY_MS, dtype=np.int64)
        touch_ms: list[int] = []
        for j, p in enumerate(paths):
            gaps = gaps_ms[j] if gaps_ms is not None else [(len(p) - i - 1) * DAY_MS for i in range(len(p))]
            touch_ms.extend(int(end[j]) - int(g) for g in gaps)
        return cls(
            channels=channels,
            start=start,
            converted=np.asarray(converted, dtype=np.float64),
            value=np.asarray(value if value is not None else converted, dtype=np.float64),
            end_ms=end,
            customer=np.arange(len(paths), dtype=np.int64),
            touch_channel=np.array([code[c] for p in paths for c in p], dtype=np.int64),
            touch_ms=np.array(touch_ms, dtype=np.int64),
            touch_journey=np.repeat(np.arange(len(paths), dtype=np.int64), lengths),
            customer_ids=[str(i) for i in range(len(paths))],
        )


def build_journeys(
    *,
    channels: Sequence[str],
    touch_customer: IntArray,
    touch_ms: IntArray,
    touch_channel: IntArray,
    conv_customer: IntArray,
    conv_ms: IntArray,
    conv_value: FloatArray,
    window_ms: int,
    customer_ids: Sequence[str] = (),
) -> Journeys:
    """Cut customers' touches into journeys (vectorised; inputs in any order).

    Customers and channels are integer codes. A touch at the same millisecond as a
    conversion counts before it; touches after a customer's last conversion (within
    ``window_ms`` of their last touch) make an open journey.

    >>> ms = lambda d: int(d * DAY_MS)
    >>> j = build_journeys(channels=["email", "search"],
    ...     touch_customer=np.array([0, 0, 0, 1]), touch_ms=np.array([ms(1), ms(40), ms(45), ms(2)]),
    ...     touch_channel=np.array([0, 0, 1, 1]),
    ...     conv_customer=np.array([0]), conv_ms=np.array([ms(44)]), conv_value=np.array([9.5]),
    ...     window_ms=ms(30))
    >>> j.paths(), j.converted.tolist(), j.value.tolist()
    ([['email'], ['search'], ['search']], [1.0, 0.0, 0.0], [9.5, 0.0, 0.0])
    """
    t_cust = np.asarray(touch_customer, dtype=np.int64)
    t_ms = np.asarray(touch_ms, dtype=np.int64)
    t_chan = np.asarray(touch_channel, dtype=np.int64)
    c_cust = np.asarray(conv_customer, dtype=np.int64)
    c_ms = np.asarray(conv_ms, dtype=np.int64)
    c_val = np.asarray(conv_value, dtype=np.float64)
    n_conv = int(c_cust.shape[0])

    base = min(int(t_ms.min()) if t_ms.size else 0, int(c_ms.min()) if c_ms.size else 0)
    span = max(int(t_ms.max()) if t_ms.size else 0, int(c_ms.max()) if c_ms.size else 0) - base
    n_cust = max(int(t_cust.max()) + 1 if t_cust.size else 0, int(c_cust.max()) + 1 if c_cust.size else 0)
    shift = max(int(span).bit_length(), 1)
    if shift + max(n_cust, 1).bit_length() > 62:
        raise AttributionError("too many customers over too long a time span to index")

    # Sort conversions by (customer, time) with one int64 key.
    c_key = (c_cust << shift) | (c_ms - base)
    c_order = np.argsort(c_key, kind="stable")
    c_key, c_cust, c_ms, c_val = c_key[c_order], c_cust[c_order], c_ms[c_order], c_val[c_order]

    t_key = (t_cust << shift) | (t_ms - base)
    t_order = np.argsort(t_key, kind="stable")
    t_key, t_cust, t_ms, t_chan = t_key[t_order], t_cust[t_order], t_ms[t_order], t_chan[t_order]

    # The first conversion at or after each touch, if it is the same customer's.
    nxt = np.searchsorted(c_key, t_key, side="left")
    has_next = nxt < n_conv
    nxt_c = np.minimum(nxt, max(n_conv - 1, 0))
    same = has_next & (c_cust[nxt_c] == t_cust) if n_conv else np.zeros(t_key.shape, dtype=bool)
    conv_touch = same & (c_ms[nxt_c] - t_ms <= window_ms) if n_conv else same

    # Open journeys: touches after a customer's last conversion, within the window of
    # that customer's last touch (touches are in (customer, time) order).
    open_touch = ~same
    last_of_customer = np.append(t_cust[1:] != t_cust[:-1], True) if t_cust.size else np.zeros(0, dtype=bool)
    last_ms = np.zeros(n_cust, dtype=np.int64)
    last_ms[t_cust[last_of_customer]] = t_ms[last_of_customer]
    open_touch &= last_ms[t_cust] - t_ms <= window_ms
    oc = t_cust[open_touch]
    open_customers = oc[np.append(True, oc[1:] != oc[:-1])] if oc.size else oc

    # Journey ids in (customer, time) order: a customer's conversions, then the open
    # journey, so touches (already in that order) need no second sort.
    n_journeys = n_conv + int(open_customers.shape[0])
    j_cust = np.concatenate([c_cust, open_customers])
    n_open = int(open_customers.shape[0])
    j_kind = np.concatenate([np.zeros(n_conv, dtype=np.int64), np.ones(n_open, dtype=np.int64)])
    j_ms = np.concatenate([c_ms, last_ms[open_customers]])
    j_order = np.lexsort((j_ms, j_kind, j_cust))
    j_rank = np.empty(n_journeys, dtype=np.int64)
    j_rank[j_order] = np.arange(n_journeys)
    open_id = np.full(n_cust, -1, dtype=np.int64)
    open_id[open_customers] = j_rank[n_conv:]

    journey = np.full(t_key.shape, -1, dtype=np.int64)
    journey[conv_touch] = j_rank[nxt_c[conv_touch]]
    journey[open_touch] = open_id[t_cust[open_touch]]
    keep = journey >= 0
    journey, t_ms, t_chan = journey[keep], t_ms[keep], t_chan[keep]

    counts = np.bincount(journey, minlength=n_journeys)
    start = np.zeros(n_journeys + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    converted = np.concatenate([np.ones(n_conv), np.zeros(open_customers.shape[0])])[j_order]
    value = np.concatenate([c_val, np.zeros(open_customers.shape[0])])[j_order]
    end_ms = j_ms[j_order]
    customer = j_cust[j_order]
    return Journeys(
        channels=tuple(channels),
        start=start,
        converted=converted,
        value=value,
        end_ms=end_ms,
        customer=customer,
        touch_channel=t_chan,
        touch_ms=t_ms,
        touch_journey=journey,
        customer_ids=customer_ids,
    )


@dataclass(frozen=True, eq=False)
class TouchLog:
    """Every customer's raw touches and conversions, as integer-coded columns."""

    channels: tuple[str, ...]
    customer_ids: Sequence[str]
    touch_customer: IntArray
    touch_ms: IntArray
    touch_channel: IntArray
    conv_customer: IntArray
    conv_ms: IntArray
    conv_value: FloatArray
    #: per customer: when they were first seen (observation starts), ms; None: the period's start
    observed_from_ms: IntArray | None = None
    #: the end of observation (the data's end), ms; None: the last timestamp seen
    end_ms: int | None = None

    @property
    def n_customers(self) -> int:
        """Customers seen in either file."""
        return len(self.customer_ids)

    def period(self) -> tuple[int, int]:
        """The observation period: first and last timestamp over touches and conversions
        (the end is :attr:`end_ms` when given)."""
        lows = [int(a.min()) for a in (self.touch_ms, self.conv_ms) if a.size]
        highs = [int(a.max()) for a in (self.touch_ms, self.conv_ms) if a.size]
        if not lows:
            return (0, self.end_ms or 0)
        end = max(highs) if self.end_ms is None else max(self.end_ms, max(highs))
        return min(lows), end

    def observed_from(self) -> IntArray:
        """Per customer: the start of their observation window, ms.

        A customer first seen after the period starts (a late arrival) is at risk only
        from then; no customer starts later than their own first touch or conversion.

        >>> log = TouchLog(channels=("a",), customer_ids=["x", "y"], touch_customer=np.array([0, 1]),
        ...     touch_ms=np.array([5, 9]), touch_channel=np.array([0, 0]), conv_customer=np.array([1]),
        ...     conv_ms=np.array([20]), conv_value=np.array([1.0]), observed_from_ms=np.array([0, 12]))
        >>> log.observed_from().tolist()
        [5, 9]
        """
        t0, _t1 = self.period()
        start = np.full(self.n_customers, t0, dtype=np.int64)
        if self.observed_from_ms is not None:
            start = np.maximum(start, np.asarray(self.observed_from_ms, dtype=np.int64))
        for who, ms in ((self.touch_customer, self.touch_ms), (self.conv_customer, self.conv_ms)):
            if who.size:
                np.minimum.at(start, who, ms)
        return start

    def journeys(self, window_ms: int) -> Journeys:
        """Cut into journeys with :func:`build_journeys`."""
        return build_journeys(
            channels=self.channels,
            touch_customer=self.touch_customer,
            touch_ms=self.touch_ms,
            touch_channel=self.touch_channel,
            conv_customer=self.conv_customer,
            conv_ms=self.conv_ms,
            conv_value=self.conv_value,
            window_ms=window_ms,
            customer_ids=self.customer_ids,
        )
