"""Markov-chain removal effects of order 1 to 3, solved exactly.

Every journey is a walk ``start -> s1 -> ... -> sn -> conversion | null`` where a state
is the last ``order`` channels (shorter at the start of a walk). The transition tally
counts each step; from it the chain's absorption probability into ``conversion`` is
the solution of one sparse linear system ``(I - Q) x = r`` (no simulation). A
channel's removal effect is the relative drop of that probability when every state
containing the channel leads to ``null``; channels get the journeys' conversions in
proportion to their removal effects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp  # type: ignore[import-untyped]
import scipy.sparse.linalg as spla  # type: ignore[import-untyped]

from cadence.engine.attribution.heuristics import distinct_pairs
from cadence.engine.attribution.journeys import AttributionError, FloatArray, IntArray, Journeys

__all__ = ["TransitionTally", "markov", "removal_effects", "transition_tally"]

START, CONVERSION, NULL = -1, -2, -3


@dataclass
class TransitionTally:
    """Transition counts between states (tuples of channel codes), kept per event.

    States ``START``, ``CONVERSION`` and ``NULL`` are the negative codes -1, -2, -3.
    """

    order: int
    counts: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = field(default_factory=dict)

    def add_path(self, path: list[int], *, converted: bool, count: float = 1.0) -> None:
        """Count the walk of one journey.

        >>> t = TransitionTally(order=1); t.add_path([0, 1], converted=True)
        >>> sorted(t.counts.items())
        [(((-1,), (0,)), 1.0), (((0,), (1,)), 1.0), (((1,), (-2,)), 1.0)]
        """
        if not path:
            return
        states = [(START,)] + [tuple(path[max(0, i - self.order + 1) : i + 1]) for i in range(len(path))]
        states.append((CONVERSION,) if converted else (NULL,))
        for a, b in zip(states[:-1], states[1:], strict=True):
            self.counts[(a, b)] = self.counts.get((a, b), 0.0) + count


def transition_tally(
    journeys: Journeys, *, order: int = 1
) -> tuple[IntArray, IntArray, FloatArray, IntArray]:
    """Vectorised transition counts: (from state, to state, count) over state ids, and
    per state id its channels as a bit mask (0 for the special states 0=start,
    1=conversion, 2=null)."""
    if order not in (1, 2, 3):
        raise AttributionError(f"markov order must be 1, 2 or 3, got {order}")
    k = len(journeys.channels)
    has = journeys.length > 0
    tj = journeys.touch_journey
    ch = journeys.touch_channel
    pos = journeys.position()
    # State code: the last `order` channels, each as (channel + 1), base k + 1.
    code = np.zeros(journeys.n_touches, dtype=np.int64)
    mask = np.zeros(journeys.n_touches, dtype=np.int64)
    for lag in range(order):
        idx = np.arange(journeys.n_touches) - lag
        valid = pos >= lag
        prev = np.where(valid, ch[np.maximum(idx, 0)] + 1, 0)
        code = code * (k + 1) + prev
        mask |= np.where(valid, np.left_shift(1, ch[np.maximum(idx, 0)]), 0)
    uniq, state = np.unique(code, return_inverse=True)
    state = state.astype(np.int64) + 3
    state_mask = np.zeros(uniq.shape[0] + 3, dtype=np.int64)
    state_mask[state] = mask
    is_first = pos == 0
    is_last = np.zeros(journeys.n_touches, dtype=bool)
    is_last[journeys.start[1:][has] - 1] = True
    # start -> first state; state -> next state; last state -> conversion/null
    src = np.concatenate([np.zeros(int(is_first.sum()), dtype=np.int64), state[~is_last], state[is_last]])
    nxt = np.flatnonzero(~is_last) + 1
    absorb = np.where(journeys.converted[tj[is_last]] > 0, 1, 2)
    dst = np.concatenate([state[is_first], state[nxt], absorb])
    n_states = uniq.shape[0] + 3
    flat = np.bincount(src * n_states + dst, minlength=n_states * n_states) if n_states < 4000 else None
    if flat is not None:
        nz = np.flatnonzero(flat)
        return nz // n_states, nz % n_states, flat[nz].astype(np.float64), state_mask
    pair, counts = np.unique(src * n_states + dst, return_counts=True)
    return pair // n_states, pair % n_states, counts.astype(np.float64), state_mask


def _conversion_probability(
    src: IntArray, dst: IntArray, counts: FloatArray, n_states: int, removed: IntArray | None
) -> float:
    """Probability of absorbing in conversion from start, with ``removed`` states -> null."""
    out = np.bincount(src, weights=counts, minlength=n_states)
    prob = counts / out[src]
    if removed is not None:
        keep = ~removed[dst] & ~removed[src]
        src, dst, prob = src[keep], dst[keep], prob[keep]
    transient = np.ones(n_states, dtype=bool)
    transient[1:3] = False
    if removed is not None:
        transient &= ~removed
    index = np.cumsum(transient) - 1
    tmask = transient[src] & transient[dst]
    n_t = int(transient.sum())
    q = sp.csc_matrix((prob[tmask], (index[src[tmask]], index[dst[tmask]])), shape=(n_t, n_t))
    rmask = transient[src] & (dst == 1)
    r = np.bincount(index[src[rmask]], weights=prob[rmask], minlength=n_t)
    x = spla.spsolve((sp.identity(n_t, format="csc") - q).tocsc(), r)
    return float(np.atleast_1d(x)[0])


def removal_effects(journeys: Journeys, *, order: int = 1) -> tuple[FloatArray, float]:
    """Per channel removal effect, and the chain's conversion probability.

    >>> j = Journeys.from_paths([["a", "b"], ["a"], ["b"]], converted=[1, 0, 0])
    >>> effects, p = removal_effects(j)
    >>> [round(e, 3) for e in effects.tolist()], round(p, 3)
    ([0.5, 1.0], 0.333)
    """
    src, dst, counts, state_mask = transition_tally(journeys, order=order)
    n_states = state_mask.shape[0]
    base = _conversion_probability(src, dst, counts, n_states, None)
    effects = np.zeros(len(journeys.channels))
    if base <= 0:
        return effects, base
    for c in range(len(journeys.channels)):
        removed = (state_mask >> c) & 1 == 1
        effects[c] = 1.0 - _conversion_probability(src, dst, counts, n_states, removed) / base
    return np.clip(effects, 0.0, None), base


def markov(journeys: Journeys, *, order: int = 1) -> FloatArray:
    """Markov removal-effect credit (per touch; channel totals match the removal shares).

    >>> j = Journeys.from_paths([["a", "b"], ["a"], ["b", "a"], ["b"]], converted=[1, 1, 1, 0])
    >>> from cadence.engine.attribution.heuristics import channel_totals
    >>> {c: round(v, 3) for c, v in channel_totals(j, markov(j)).items()}
    {'a': 1.75, 'b': 1.25}
    """
    if journeys.n_touches == 0:
        return np.zeros(0)
    effects, _ = removal_effects(journeys, order=order)
    inverse, pair_journey, pair_channel, pair_touches = distinct_pairs(journeys)
    conv = journeys.converted[pair_journey]
    weight = effects[pair_channel]
    per_journey = np.bincount(pair_journey, weights=weight, minlength=journeys.n_journeys)
    denom = per_journey[pair_journey]
    share = np.divide(weight, denom, out=np.zeros_like(weight), where=denom > 0) * conv
    # Channel totals follow the global removal shares (the usual definition).
    total_conv = float(journeys.converted[journeys.length > 0].sum())
    if effects.sum() > 0:
        target = total_conv * effects / effects.sum()
        got = np.bincount(pair_channel, weights=share, minlength=len(effects))
        share *= np.divide(target, got, out=np.zeros_like(target), where=got > 0)[pair_channel]
    return (share / pair_touches)[inverse]
