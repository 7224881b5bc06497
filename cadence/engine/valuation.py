"""Each group's best send time in one compiled loop (numba), the same numbers as the numpy valuation.

:meth:`cadence.engine.learners.DecisionLearner.best_options` values every (group, send time)
option of a decision whose groups share one list of send times: the posterior-mean and drawn
probit scores, the normal CDF of each, the unsubscribe risk (per send time with the fitted
hazard), the "worth sending" check (with ``volume_optimism``: at the raised customer effect)
and the score fix-ups, then each group's first best. In numpy that is some 30 calls over
(2 x groups x times) arrays; :func:`best_of_groups` does the same operations on the same
float64 numbers, in the same order, one option at a time, so its answer is bit for bit the
numpy path's (IEEE arithmetic without fused multiply-adds, and scipy's own ``ndtr`` through
its C entry point).

numba costs about a second to import and load, so the kernel is made off the caller's path:
:func:`kernel` returns None until a background thread, started by the first call after
:data:`WARM_AFTER` calls in the process, has it ready (short-lived processes such as tests and
CLI commands never pay for it). Compiled code is cached on disk next to this module, or in
numba's user-wide cache when the install is read-only; without a usable cache it compiles in
memory. Without numba (or if loading it fails) the numpy path stays.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Calls of :func:`kernel` after which the compiled loop is prepared in the background.
WARM_AFTER = 200

_state: dict[str, Any] = {"calls": 0, "kernel": None, "thread": None, "failed": False, "off": False}
_lock = threading.Lock()
_building = threading.Lock()
#: scipy's ndtr as a numba external function (set by :func:`_build` before compiling).
_ndtr: Any = None


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
    at: Any,
    score: Any,
    eng: Any,
    uns: Any,
    explored: Any,
) -> None:
    """Each group's best option, as the numpy valuation picks it (compiled by :func:`_build`).

    Arguments: the per-group posterior-mean and drawn scores ``pg0``, ``pg1`` and variance
    ``pgv``; the per-time parts ``tw0``, ``tw1``, ``tv``; ``up`` (per group, the mean score with the
    customer's effect raised; used when ``hope``); ``risk_g`` (per group, ``unsubscribe_cost *``
    the channel's rate) and ``timing`` (per time; used when ``timed``); ``draw_g`` (per group, the
    drawn risk; used when ``drawn``, which is never ``timed``); ``rates_g`` (the channel rates,
    for the reported unsubscribe probability); ``camp_of`` (each group's campaign number);
    scalars. Fills ``at``, ``score``, ``eng``, ``uns``, ``explored`` per group.
    """
    n_groups = pg0.shape[0]
    n_times = tw0.shape[0]
    group_best = np.empty(n_groups)
    best_mean = np.empty(n_groups)
    # First pass: every option; keep each group's first best score (NaN first, as argmax)
    # and its best mean value (NaN propagating, as np.maximum).
    for k in range(n_groups):
        a0 = pg0[k]
        a1 = pg1[k]
        av = pgv[k]
        rk = risk_g[k]
        best_j = 0
        best_s = 0.0
        best_m = 0.0
        best_p = 0.0
        gb = 0.0
        for j in range(n_times):
            spread = math.sqrt((av + tv[j]) + beta2)
            m0 = (a0 + tw0[j]) / spread
            m1 = a1 + tw1[j]
            if beta != 1.0:
                m1 = m1 / beta
            p0 = _ndtr(m0)
            p1 = _ndtr(m1)
            r = rk * timing[j] if timed else rk
            dr = draw_g[k] if drawn else r
            s = (p1 if value == 1.0 else value * p1) - dr
            ms = (p0 if value == 1.0 else value * p0) - r
            if hope:
                h = _ndtr((up[k] + tw0[j]) / spread)
                wv = (h if value == 1.0 else value * h) - r
            else:
                wv = ms
            if wv > 0:
                if s <= 0:
                    s = wv * 1e-6
            elif not explore_volume and s > 0.0:
                s = 0.0
            if j == 0:
                best_s, best_m, best_p, gb = s, ms, p0, ms
            else:
                if not math.isnan(best_s) and (s > best_s or math.isnan(s)):
                    best_j, best_s, best_m, best_p = j, s, ms, p0
                if (ms > gb or math.isnan(ms)) and not math.isnan(gb):
                    gb = ms
        at[k] = best_j
        score[k] = best_s
        eng[k] = best_p
        uns[k] = rates_g[k] * timing[best_j] if timed else rates_g[k]
        group_best[k] = gb
        best_mean[k] = best_m
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


_F = "float64[:]"  # any stride: (groups,) rows of the learners' (2 x groups) arrays are not contiguous
_SIGNATURE = (
    f"void({_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, {_F}, int64[:], int64,"
    " float64, float64, float64, boolean, boolean, boolean, boolean,"
    " int64[::1], float64[::1], float64[::1], float64[::1], boolean[::1])"
)


def _build() -> Callable[..., Any]:
    """Import numba and compile (or load from its cache) the loop for its one signature."""
    import llvmlite.binding as llvm
    import numba
    from numba.extending import get_cython_function_address

    llvm.add_symbol(
        "cadence_scipy_ndtr",
        get_cython_function_address("scipy.special.cython_special", "__pyx_fuse_1ndtr"),
    )
    global _ndtr
    _ndtr = numba.types.ExternalFunction("cadence_scipy_ndtr", numba.types.float64(numba.types.float64))
    try:
        compiled = numba.njit(_SIGNATURE, cache=True, nogil=True)(best_of_groups)
    except RuntimeError:  # no writable cache location (numba's own or its user-wide one): in memory
        compiled = numba.njit(_SIGNATURE, nogil=True)(best_of_groups)
    return compiled  # type: ignore[no-any-return]


def _warm() -> None:
    """Build the kernel once (in the background thread); on any failure keep the numpy path."""
    with _building:
        if _state["kernel"] is not None or _state["failed"]:
            return
        try:
            built = _build()
        except Exception:  # noqa: BLE001 - numba missing or broken: the numpy valuation gives the same answer
            log.info("compiled valuation unavailable; options are valued with numpy", exc_info=True)
            _state["failed"] = True
            return
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


def load_now() -> Callable[..., Any] | None:
    """Prepare the kernel in this thread and return it (None when numba cannot be had)."""
    _warm()
    return _state["kernel"]  # type: ignore[no-any-return]


def set_enabled(enabled: bool) -> bool:
    """Switch the compiled loop on or off for this process (tests and A/B runs); returns the old value."""
    old = not _state["off"]
    _state["off"] = not enabled
    return old
