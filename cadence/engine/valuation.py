"""The learners' scoring in compiled loops (numba): each group's best send time, and the score's parts.

:meth:`cadence.engine.learners.DecisionLearner.best_options` values every (group, send time)
option of a decision whose groups share one list of send times: the posterior-mean and drawn
probit scores, the normal CDF of each, the unsubscribe risk (per send time with the fitted
hazard), the "worth sending" check (with ``volume_optimism``: at the raised customer effect)
and the score fix-ups, then each group's first best. In numpy that is some 30 calls over
(2 x groups x times) arrays; :func:`best_of_groups` does the same operations on the same
float64 numbers, in the same order, one option at a time, so its answer is bit for bit the
numpy path's (IEEE arithmetic without fused multiply-adds, and scipy's own ``ndtr`` through
its C entry point).

Before that, :func:`score_parts` computes what the options' scores are made of (each group's
linear score and variance, each send time's, the hour preference's rows), which numpy does in
about 40 small array operations. Its sums of products run in another order than numpy's, so
it is not bit for bit numpy's: it is used only in a process that turned it on from its start
(:func:`load_now` with ``parts=True``: a served one), see :func:`parts_kernel`.

numba costs about a second to import and load, so the kernel is made off the caller's path:
:func:`kernel` returns None until a background thread, started by the first call after
:data:`WARM_AFTER` calls in the process, has it ready (short-lived processes such as tests and
CLI commands never pay for it); ``cadence serve`` loads it at start-up instead, with
:func:`load_now`, through :func:`cadence.api.workers.prepare_serving`). Compiled code is
cached on disk next to this module, or in numba's user-wide cache when the install is
read-only; without a usable cache it compiles in memory. Without numba (or if loading it fails) the numpy path stays.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.special import ndtr  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

#: Calls of :func:`kernel` after which the compiled loop is prepared in the background.
WARM_AFTER = 1000

_state: dict[str, Any] = {
    "calls": 0,
    "kernel": None,
    "parts": None,
    "parts_on": False,
    "thread": None,
    "failed": False,
    "off": False,
}
_lock = threading.Lock()
_building = threading.Lock()
#: scipy's ndtr as a numba external function (set by :func:`_build` before compiling).
_ndtr: Any = None


#: The bracket table: scipy's ndtr at -8, -8 + 1/64, ..., 8. Between two points the normal CDF is
#: within h^2/8 * max|phi'| = 0.0302 / 64^2 = 7.4e-6 of the chord (phi' = -x phi(x), at most
#: 0.242; measured 7.38e-6), and scipy's ndtr within 1e-13 of the CDF on [-8, 8]: the chord +- 1e-5 brackets it.
TABLE_LO, TABLE_STEP, TABLE_N, TABLE_EPS = -8.0, 64.0, 1024, 1e-5
TABLE = np.asarray(ndtr(TABLE_LO + np.arange(TABLE_N + 1) / TABLE_STEP), dtype=np.float64)


def chord(table: Any, z: float) -> float:
    """The normal CDF at ``z`` (in the table's range) on the chord between two :data:`TABLE` points.

    >>> bool(abs(chord(TABLE, 0.3) - float(ndtr(0.3))) < TABLE_EPS)
    True
    """
    t = (z - TABLE_LO) * TABLE_STEP
    i = int(t)
    return table[i] + (t - i) * (table[i + 1] - table[i])  # type: ignore[no-any-return]


def exact_option(
    j: int,
    z0: Any,
    z1: Any,
    zu: Any,
    risk: Any,
    draw: Any,
    value: float,
    hope: bool,
    explore_volume: bool,
    xs: Any,
    xm: Any,
    xp: Any,
    done: Any,
) -> None:
    """Value option ``j`` exactly as the numpy valuation does: score, mean value, engagement."""
    p0 = _ndtr(z0[j])
    p1 = _ndtr(z1[j])
    r = risk[j]
    s = (p1 if value == 1.0 else value * p1) - draw[j]
    ms = (p0 if value == 1.0 else value * p0) - r
    if hope:
        h = _ndtr(zu[j])
        wv = (h if value == 1.0 else value * h) - r
    else:
        wv = ms
    if wv > 0:
        if s <= 0:
            s = wv * 1e-6
    elif not explore_volume and s > 0.0:
        s = 0.0
    xs[j] = s
    xm[j] = ms
    xp[j] = p0
    done[j] = True


def best_of_groups(
    pg0: Any,
    pg1: Any,
    pgv: Any,
    tw0: Any,
    tw1: Any,
    tv: Any,
    up: Any,
    risk_g: Any,
    timing: Any,
    draw_g: Any,
    rates_g: Any,
    camp_of: Any,
    n_camps: int,
    beta2: float,
    beta: float,
    value: float,
    hope: bool,
    timed: bool,
    drawn: bool,
    explore_volume: bool,
    table: Any,
    at: Any,
    score: Any,
    eng: Any,
    uns: Any,
    explored: Any,
    draws: Any,
    means: Any,
) -> None:
    """Each group's best option, as the numpy valuation picks it (compiled by :func:`_build`).

    Arguments: the per-group posterior-mean and drawn scores ``pg0``, ``pg1`` and variance
    ``pgv``; the per-time parts ``tw0``, ``tw1``, ``tv``; ``up`` (per group, the mean score with the
    customer's effect raised; used when ``hope``); ``risk_g`` (per group, ``unsubscribe_cost *``
    the channel's rate) and ``timing`` (per time; used when ``timed``); ``draw_g`` (per group, the
    drawn risk; used when ``drawn``, which is never ``timed``); ``rates_g`` (the channel rates,
    for the reported unsubscribe probability); ``camp_of`` (each group's campaign number);
    scalars; :data:`TABLE`. Fills ``at``, ``score``, ``eng``, ``uns``, ``explored``, and the chosen
    option's drawn value and value at the posterior mean (``draws``, ``means``) per group.

    Every option's probit scores and risks are computed as in numpy; the normal CDF, about 150
    instructions a value, is first bracketed from :data:`TABLE` (``ndtr`` rises with its
    argument, so each value, worth check and score fix-up gets a lower and an upper bound), and
    evaluated exactly only where a bound cannot settle it: an option whose score's upper bound
    is below another option's lower bound is not its group's best, and likewise for the best
    mean value. The options left are valued exactly and compared as numpy does (the first of
    equal scores). A group with a NaN is valued fully (NaN first, as ``argmax``).
    """
    n_groups = pg0.shape[0]
    n_times = tw0.shape[0]
    group_best = np.empty(n_groups)
    best_mean = np.empty(n_groups)
    z0 = np.empty(n_times)
    z1 = np.empty(n_times)
    zu = np.zeros(n_times)
    risk = np.empty(n_times)
    draw = np.empty(n_times)
    s_lo = np.empty(n_times)
    s_hi = np.empty(n_times)
    m_lo = np.empty(n_times)
    m_hi = np.empty(n_times)
    xs = np.empty(n_times)
    xm = np.empty(n_times)
    xp = np.empty(n_times)
    done = np.zeros(n_times, dtype=np.bool_)
    kind = np.zeros(n_times, dtype=np.int64)
    bounded = value > 0.0
    lo_z, eps = TABLE_LO, TABLE_EPS
    hi_z = TABLE_LO + TABLE_N / TABLE_STEP
    for k in range(n_groups):
        a0 = pg0[k]
        a1 = pg1[k]
        av = pgv[k]
        rk = risk_g[k]
        has_nan = False
        for j in range(n_times):
            spread = math.sqrt((av + tv[j]) + beta2)
            m0 = (a0 + tw0[j]) / spread
            m1 = a1 + tw1[j]
            if beta != 1.0:
                m1 = m1 / beta
            r = rk * timing[j] if timed else rk
            z0[j] = m0
            z1[j] = m1
            risk[j] = r
            draw[j] = draw_g[k] if drawn else r
            mu = 0.0
            if hope:
                mu = (up[k] + tw0[j]) / spread
                zu[j] = mu
            done[j] = False
            settled = False
            if bounded and lo_z <= m0 < hi_z and lo_z <= m1 < hi_z and lo_z <= mu < hi_z:
                c0 = chord(table, m0)
                c1 = chord(table, m1)
                ml = value * (c0 - eps) - r
                mh = value * (c0 + eps) - r
                if hope:
                    cu = chord(table, mu)
                    wl = value * (cu - eps) - r
                    wh = value * (cu + eps) - r
                else:
                    wl = ml
                    wh = mh
                vl = value * (c1 - eps) - draw[j]
                vh = value * (c1 + eps) - draw[j]
                # Which of the score's cases holds (kind): 1 worth sending and a positive drawn
                # value (the score is the drawn value), 2 worth sending and a drawn value at or
                # below zero (1e-6 of the worth value), 3 not worth sending (the drawn value, at
                # most 0 unless explore_volume).
                settled = True
                if wl > 0:
                    if vl > 0:
                        sl, sh, kind[j] = vl, vh, 1
                    elif vh <= 0:
                        sl, sh, kind[j] = wl * 1e-6, wh * 1e-6, 2
                    else:
                        settled = False
                elif wh <= 0:
                    kind[j] = 3
                    if explore_volume:
                        sl, sh = vl, vh
                    else:
                        sl, sh = min(vl, 0.0), min(vh, 0.0)
                else:
                    settled = False
                if settled:
                    s_lo[j] = sl
                    s_hi[j] = sh
                    m_lo[j] = ml
                    m_hi[j] = mh
            if not settled:
                exact_option(j, z0, z1, zu, risk, draw, value, hope, explore_volume, xs, xm, xp, done)
                s_lo[j] = s_hi[j] = xs[j]
                m_lo[j] = m_hi[j] = xm[j]
                if math.isnan(xs[j]) or math.isnan(xm[j]):
                    has_nan = True
        if has_nan:  # value every option; argmax's and np.maximum's NaN rules
            for j in range(n_times):
                if not done[j]:
                    exact_option(j, z0, z1, zu, risk, draw, value, hope, explore_volume, xs, xm, xp, done)
            best_j = 0
            gb = xm[0]
            for j in range(1, n_times):
                if not math.isnan(xs[best_j]) and (xs[j] > xs[best_j] or math.isnan(xs[j])):
                    best_j = j
                if (xm[j] > gb or math.isnan(xm[j])) and not math.isnan(gb):
                    gb = xm[j]
        else:
            # The best score: only options whose upper bound reaches the highest lower bound.
            floor = s_lo[0]
            for j in range(1, n_times):
                floor = max(floor, s_lo[j])
            # Each option's exact score needs one ndtr in its case, none when the last option
            # valued had the same case, argument and risk (times often share them exactly).
            best_j = -1
            best_s = 0.0
            last_kind, last_z, last_r, last_s = 0, np.nan, np.nan, np.nan
            for j in range(n_times):
                if s_hi[j] >= floor:
                    if done[j]:
                        sj = xs[j]
                    else:
                        kd = kind[j]
                        if kd == 2:
                            arg = zu[j] if hope else z0[j]
                            rr = risk[j]
                        else:
                            arg = z1[j]
                            rr = draw[j]
                        if kd == last_kind and arg == last_z and rr == last_r:
                            sj = last_s
                        else:
                            p = _ndtr(arg)
                            x = (p if value == 1.0 else value * p) - rr
                            if kd == 2:
                                sj = x * 1e-6
                            elif kd == 3 and not explore_volume and x > 0.0:
                                sj = 0.0
                            else:
                                sj = x
                            last_kind, last_z, last_r, last_s = kd, arg, rr, sj
                    if best_j < 0 or sj > best_s:
                        best_j = j
                        best_s = sj
            if done[best_j]:
                best_p = xp[best_j]
                best_m = xm[best_j]
            else:
                best_p = _ndtr(z0[best_j])
                best_m = (best_p if value == 1.0 else value * best_p) - risk[best_j]
            # The best mean value, likewise (the chosen option's is known). Only the mean value is
            # needed: one ndtr, none for an option with the same score and risk as the last one.
            floor = m_lo[0]
            for j in range(1, n_times):
                floor = max(floor, m_lo[j])
            gb = best_m
            last_z, last_r, last_m = z0[best_j], risk[best_j], best_m
            for j in range(n_times):
                if m_hi[j] >= floor:
                    if done[j]:
                        mj = xm[j]
                    elif z0[j] == last_z and risk[j] == last_r:
                        mj = last_m
                    else:
                        p0 = _ndtr(z0[j])
                        mj = (p0 if value == 1.0 else value * p0) - risk[j]
                        last_z, last_r, last_m = z0[j], risk[j], mj
                    gb = max(gb, mj)
            xs[best_j] = best_s
            xp[best_j] = best_p
            xm[best_j] = best_m
        at[k] = best_j
        score[k] = xs[best_j]
        eng[k] = xp[best_j]
        uns[k] = rates_g[k] * timing[best_j] if timed else rates_g[k]
        group_best[k] = gb
        best_mean[k] = xm[best_j]
        means[k] = xm[best_j]
        # The drawn value before the score's fix-ups (one ndtr a group: the explanation shows it).
        p1 = _ndtr(z1[best_j])
        draws[k] = (p1 if value == 1.0 else value * p1) - draw[best_j]
    # Each campaign's best mean value (the groups' maximum, NaN propagating); explored when
    # the chosen option's mean value is below it.
    camp_best = np.full(n_camps, -np.inf)
    for k in range(n_groups):
        c = camp_of[k]
        g = group_best[k]
        if (g > camp_best[c] or math.isnan(g)) and not math.isnan(camp_best[c]):
            camp_best[c] = g
    for k in range(n_groups):
        explored[k] = best_mean[k] < camp_best[camp_of[k]] - 1e-12


def score_parts(
    mean: Any,
    sd: Any,
    var: Any,
    noise_e: Any,
    noise_u: Any,
    b: Any,
    t1: Any,
    harm: Any,
    harm_sq: Any,
    t_col: int,
    rate_exp: Any,
    hours: Any,
    match_angle: float,
    match_scale: float,
    lp: Any,
    spread: Any,
    hour_scale: float,
    loglik: Any,
    pop_draw: bool,
    f_t: Any,
    reference: float,
    whole: Any,
    offset_scale: float,
    ch_global: Any,
    camp_idx: Any,
    cc_idx: Any,
    effect_noise: Any,
    eff: Any,
    channel_var: float,
    layout: Any,
    per_group: Any,
    per_group_v: Any,
    eff_sd: Any,
    time_w: Any,
    time_v: Any,
    hour_rows: Any,
) -> None:
    """The learners' per-group and per-time score parts (compiled by :func:`_build`).

    What :meth:`cadence.engine.learners.DecisionLearner._score` computes with numpy before
    valuing the options, for the configuration a server runs (the probit's hour x trait block
    at its posterior mean, the hour preference's expected lift, no variants, the probit
    customer effect): the posterior-mean and drawn score of each group ``per_group`` (2 x
    groups), its variance ``per_group_v`` and its customer-effect sd ``eff_sd``; the time part
    ``time_w`` (2 x times: mean, draw) and its variance ``time_v``; the hour preference's
    ``hour_rows`` (2 x times). The same formulas in the same order, but sums of products in
    loops rather than numpy's BLAS calls, so the results can differ from numpy's in the last
    bits: :func:`load_now` with ``parts=True`` turns it on for a whole process (a served one),
    never halfway through a run.

    Arguments: the engagement model's ``mean``, ``sd`` and ``var``; the posterior draw's
    normals ``noise_e`` and ``noise_u``; the customer vector ``b`` and traits ``t1``; the send
    times' features ``harm`` and their squares (the block starts at column ``t_col``); the
    customer's own rate and experience per channel ``rate_exp``; the send times' fractional
    local ``hours`` with the hour match's angle and scale (``match_scale`` 0 when the customer
    has no click); the hour preference's log prior ``lp``, its draw's ``spread`` and scale
    ``hour_scale`` (of ``noise_u[64:88]``), the customer's ``loglik`` over preferred hours
    (empty: none yet), the pop-draw switch, ``f_t`` (its ``F`` transposed) and ``reference``, the
    send times' ``whole`` local hours and the offset scale; the groups' channel, campaign and
    campaign-channel weight indices and effect-noise index; ``eff`` (2 x channels, empty while
    the customer's effect is the prior ``channel_var``); ``layout``: the weight vector's channel,
    time and personal offsets and its customer and trait block sizes. ``hour_rows`` with no
    column: no hour preference.
    """
    ch0, tlo, personal, n_cust, n_tr = layout[0], layout[1], layout[2], layout[3], layout[4]
    n_ch = rate_exp.shape[0]
    n_times = harm.shape[0]
    n_groups = ch_global.shape[0]
    # The drawn weights that are read: the personal block and, per group, the biases.
    wp0 = np.empty(3)
    wp1 = np.empty(3)
    for i in range(3):
        wp0[i] = mean[personal + i]
        wp1[i] = sd[personal + i] * noise_e[personal + i] + mean[personal + i]
    # Per channel: the customer block, then the own rate and experience.
    chan0 = np.empty(n_ch)
    chan1 = np.empty(n_ch)
    chan_v = np.empty(n_ch)
    for c in range(n_ch):
        base = ch0 + c * n_cust
        s0 = 0.0
        s1 = 0.0
        sv = 0.0
        for k in range(n_cust):
            x = b[k]
            if x != 0.0:
                i = base + k
                s0 += mean[i] * x
                s1 += (sd[i] * noise_e[i] + mean[i]) * x
                sv += var[i] * (x * x)
        r, e = rate_exp[c, 0], rate_exp[c, 1]
        chan0[c] = s0 + (wp0[0] * r + wp0[2] * e)
        chan1[c] = s1 + (wp1[0] * r + wp1[2] * e)
        chan_v[c] = sv + (r * r * var[personal] + e * e * var[personal + 2])
    # The hour x trait block at its posterior mean, then per send time.
    t_lo = tlo + t_col * n_tr
    n_t = (personal - t_lo) // n_tr
    u = np.zeros(n_t)
    uv = np.zeros(n_t)
    for f in range(n_t):
        at = t_lo + f * n_tr
        for k in range(n_tr):
            x = t1[k]
            if x != 0.0:
                u[f] += mean[at + k] * x
                uv[f] += var[at + k] * x
    two_pi = 2.0 * math.pi
    for j in range(n_times):
        s = 0.0
        sv = 0.0
        for f in range(n_t):
            s += u[f] * harm[j, t_col + f]
            sv += uv[f] * harm_sq[j, t_col + f]
        time_w[0, j] = s
        time_w[1, j] = s
        time_v[j] = sv
        if match_scale != 0.0:
            m = math.cos(two_pi * hours[j] / 24 - match_angle) * match_scale
            time_w[0, j] += wp0[1] * m
            time_w[1, j] += wp1[1] * m
            time_v[j] += var[personal + 1] * m * m
    # The hour preference: the posterior over the preferred hour with the population's mean
    # curve (row 0) and its draw (row 1), and the log of each send hour's expected lift.
    if hour_rows.shape[1] > 0:
        x = np.empty((2, 24))
        top = -np.inf
        for h in range(24):
            x[0, h] = lp[h]
            x[1, h] = spread[h] * (hour_scale * noise_u[64 + h]) + lp[h] if pop_draw else lp[h]
            if loglik.shape[0] > 0:
                x[0, h] += loglik[h]
                x[1, h] += loglik[h]
            top = max(top, x[0, h], x[1, h])
        lift = np.empty((2, 24))
        for r in range(2):
            total = 0.0
            for h in range(24):
                x[r, h] = math.exp(x[r, h] - top)
                total += x[r, h]
            for h in range(24):
                acc = 0.0
                for m in range(24):
                    acc += x[r, m] * f_t[m, h]
                lift[r, h] = math.log(acc / (total * reference)) * offset_scale
        for j in range(n_times):
            h = whole[j]
            for r in range(2):
                hour_rows[r, j] = lift[r, h]
                time_w[r, j] += lift[r, h]
    # Per group: its channel's part, the campaign and campaign-channel biases, the customer's effect.
    has_eff = eff.shape[0] > 0
    n_u = noise_u.shape[0]
    for g in range(n_groups):
        c = ch_global[g]
        i, k = camp_idx[g], cc_idx[g]
        w1i = sd[i] * noise_e[i] + mean[i]
        w1k = sd[k] * noise_e[k] + mean[k]
        p0 = chan0[c] + mean[i] + mean[k]
        p1 = chan1[c] + w1i + w1k
        pv = chan_v[c] + var[i] + var[k]
        z = effect_noise[g]
        z = z + n_u if z < 0 else z
        if has_eff:
            em, ev = eff[0, c], eff[1, c]
            es = math.sqrt(ev)
            p0 += em
            p1 += em + es * noise_u[z]
            pv += ev
        else:
            es = math.sqrt(channel_var)
            p1 += es * noise_u[z]
            pv += channel_var
        per_group[0, g] = p0
        per_group[1, g] = p1
        per_group_v[g] = pv
        eff_sd[g] = es


_F = "float64[:]"  # any stride: (groups,) rows of the learners' (2 x groups) arrays are not contiguous
_SIGNATURE = (
    f"void({_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, int64[:], int64,"
    " float64, float64, float64, boolean, boolean, boolean, boolean, float64[::1],"
    " int64[::1], float64[::1], float64[::1], float64[::1], boolean[::1], float64[::1], float64[::1])"
)


def _parts_signature() -> Any:
    """:func:`score_parts`'s one signature (inputs read-only, any layout where a view may come)."""
    from numba import types as t

    f64, i64 = t.float64, t.int64

    def arr(dtype: Any, ndim: int, layout: str = "A", readonly: bool = True) -> Any:
        return t.Array(dtype, ndim, layout, readonly=readonly)

    v, m, iv = arr(f64, 1), arr(f64, 2), arr(i64, 1)
    out1, out2 = arr(f64, 1, "C", False), arr(f64, 2, "C", False)
    return t.void(
        v, v, v, v, v,  # mean, sd, var, noise_e, noise_u
        v, v, m, m, i64, m,  # b, t1, harm, harm_sq, t_col, rate_exp
        v, f64, f64,  # hours, match_angle, match_scale
        v, v, f64, v, t.boolean, m, f64, iv, f64,  # lp, spread, hour_scale, loglik, pop_draw, f_t, reference, whole, offset_scale
        iv, iv, iv, iv, m, f64, iv,  # ch_global, camp_idx, cc_idx, effect_noise, eff, channel_var, layout
        out2, out1, out1, out2, out1, out2,  # per_group, per_group_v, eff_sd, time_w, time_v, hour_rows
    )  # fmt: skip


def _build() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Import numba and compile (or load from its cache) :func:`best_of_groups` and :func:`score_parts`."""
    import llvmlite.binding as llvm  # type: ignore[import-untyped]
    import numba
    from numba.extending import get_cython_function_address

    llvm.add_symbol(
        "cadence_scipy_ndtr",
        get_cython_function_address("scipy.special.cython_special", "__pyx_fuse_1ndtr"),
    )
    global _ndtr, exact_option, chord
    _ndtr = numba.types.ExternalFunction("cadence_scipy_ndtr", numba.types.float64(numba.types.float64))
    plain_option, plain_chord = exact_option, chord
    try:
        exact_option = numba.njit(cache=True, nogil=True)(plain_option)
        chord = numba.njit(cache=True, nogil=True)(plain_chord)
        compiled = numba.njit(_SIGNATURE, cache=True, nogil=True)(best_of_groups)
        parts = numba.njit(_parts_signature(), cache=True, nogil=True)(score_parts)
    except RuntimeError:  # no writable cache location (numba's own or its user-wide one): in memory
        exact_option = numba.njit(nogil=True)(plain_option)
        chord = numba.njit(nogil=True)(plain_chord)
        compiled = numba.njit(_SIGNATURE, nogil=True)(best_of_groups)
        parts = numba.njit(_parts_signature(), nogil=True)(score_parts)
    return compiled, parts


def _warm() -> None:
    """Build the kernel once (in the background thread); on any failure keep the numpy path."""
    with _building:
        if _state["kernel"] is not None or _state["failed"]:
            return
        try:
            built, parts = _build()
        except Exception:  # noqa: BLE001 - numba missing or broken: the numpy valuation gives the same answer
            log.info("compiled valuation unavailable; options are valued with numpy", exc_info=True)
            _state["failed"] = True
            return
        _state["parts"] = parts
        _state["kernel"] = built


def kernel() -> Callable[..., Any] | None:
    """The compiled :func:`best_of_groups`, or None while it is not ready (or cannot be had).

    The :data:`WARM_AFTER`-th call starts preparing it in a daemon thread.
    """
    if _state["off"]:
        return None
    got = _state["kernel"]
    if got is not None or _state["failed"]:
        return got  # type: ignore[no-any-return]
    _state["calls"] += 1
    if _state["calls"] >= WARM_AFTER and _state["thread"] is None:
        with _lock:
            if _state["thread"] is None:
                thread = threading.Thread(target=_warm, name="cadence-valuation-compile", daemon=True)
                _state["thread"] = thread
                thread.start()
    return None


def load_now(*, parts: bool = False) -> Callable[..., Any] | None:
    """Prepare the kernel in this thread and return it (None when numba cannot be had).

    ``parts``: from now on this process also computes the score parts with the compiled
    :func:`score_parts` (see :func:`parts_kernel`). A served process does, from its start
    (:func:`cadence.api.workers.prepare_serving`).
    """
    _warm()
    if parts:
        _state["parts_on"] = True
    return _state["kernel"]  # type: ignore[no-any-return]


def parts_kernel() -> Callable[..., Any] | None:
    """The compiled :func:`score_parts` when this process turned it on (``load_now(parts=True)``), else None.

    Unlike :func:`best_of_groups`, it is not bit for bit numpy's (its sums of products run in
    another order), so it is never switched on halfway through a process's work by the
    background thread: a simulation or a test run values every option one way from start to
    end, and a served process the compiled way from its first request.
    """
    if _state["off"] or not _state["parts_on"]:
        return None
    return _state["parts"]  # type: ignore[no-any-return]


def set_parts(enabled: bool) -> bool:
    """Switch the compiled score parts on or off for this process (tests and A/B runs); returns the old value."""
    old = bool(_state["parts_on"])
    _state["parts_on"] = enabled
    return old


def set_enabled(enabled: bool) -> bool:
    """Switch the compiled loop on or off for this process (tests and A/B runs); returns the old value."""
    old = not _state["off"]
    _state["off"] = not enabled
    return old
