"""Materialised attribution: the models that cannot be credited per event, kept fresh.

Rule-based models are credited when a conversion arrives (:mod:`.online`). Four
models cannot be: ``shapley``, ``shapley_ordered`` and ``markov`` are solved over
every journey, converting and open, and ``causal`` is a model fitted on every
customer's exposures, converters and non-converters alike. They are *materialised*:

* :class:`ExposureSubscriber` (an engine-loop subscriber) keeps every touch and
  conversion of the last :data:`FIT_DAYS` days per block in ``attribution_exposures``:
  the causal model's input, kept per event so a refit never reads the event log.
* :func:`refresh_fits` solves the models and writes their credit per channel to
  ``attribution_fits``, with the event-log position and the data's end they reflect,
  the wall-clock time of the fit and how long it took. Shapley models and Markov are
  solved from the coalition and path tallies (kept per conversion) and the open
  journeys; ``shapley_ordered`` needs no tally of its own: a converting path's
  ordered distinct channels are its prefix key (:func:`ordered_shapley_credit`).
  The causal model is refitted on the stored exposures of the last :data:`FIT_DAYS`
  days, each customer observed from when they were first seen (their profile's
  ``first_seen_ms``) and right-censored at the data's end.
* :class:`FitRefresher` runs :func:`refresh_fits` in a background thread on the
  leader (a PostgreSQL advisory lock of its own), every
  ``attribution_refresh_seconds``, for every block and every window that has a fit
  (plus :data:`DEFAULT_FIT_WINDOWS`), when the log has moved since.
* :func:`read_fits` is what the API and the dashboard read: one row per model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from sqlalchemy import Connection, Engine

from cadence.engine.attribution.journeys import DAY_MS, AttributionError, TouchLog
from cadence.engine.attribution.models import run_model
from cadence.engine.attribution.online import (
    _conversion_value,
    _tally_model,
    kept_windows,
    specs_of,
    touch_of,
)
from cadence.engine.attribution.spec import AttributionSpec
from cadence.engine.events import LoggedEvent
from cadence.engine.leader import Leadership
from cadence.store.db import read_connection
from cadence.store.fast import dialect_sql, dump_json, execute_many

__all__ = [
    "DEFAULT_FIT_WINDOWS",
    "FIT_DAYS",
    "MATERIALIZED_MODELS",
    "TALLY_MODELS",
    "ExposureSubscriber",
    "Fit",
    "FitRefresher",
    "fittable",
    "ordered_shapley_credit",
    "read_fits",
    "refresh_fits",
]

#: Models served from ``attribution_fits``.
MATERIALIZED_MODELS = ("shapley", "shapley_ordered", "markov", "causal")
#: Materialised models solved from the coalition and path tallies: only at the windows they are kept for.
TALLY_MODELS = ("shapley", "shapley_ordered", "markov")
#: Days of exposures kept, and the causal model's observation period.
FIT_DAYS = 90
#: Windows refreshed even when nobody asked for them yet (the dashboard's default).
DEFAULT_FIT_WINDOWS = (30,)
#: Seconds the refresher waits after start-up before its first refresh.
STARTUP_DELAY_S = 10.0
#: The leader's advisory lock for refreshes (PostgreSQL).
REFRESH_LOCK_ID = 0x0CADE9D0
EXPOSURES = "attribution_exposures"
log = logging.getLogger("cadence.attribution")


# --------------------------------------------------------------------------- exposures


@dataclass
class ExposureSubscriber:
    """The engine-loop subscriber keeping ``attribution_exposures`` (the last 90 days)."""

    runtime: Any = None
    specs: Sequence[AttributionSpec] | None = None
    name: str = EXPOSURES
    _pruned_day: dict[str, int] = field(default_factory=dict)

    def current_specs(self) -> list[AttributionSpec]:
        """The given blocks, else the loaded rules' ``attribution`` blocks (or the default)."""
        return list(self.specs) if self.specs is not None else specs_of(self.runtime)

    def start(self, conn: Connection, checkpoint: int) -> int:
        """State is in the database: resume from the stored checkpoint."""
        return checkpoint

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        """Store the batch's touches and conversions; drop exposures older than :data:`FIT_DAYS`."""
        if not batch:
            return
        newest = max(e.ts_ms for e in batch)
        for spec in self.current_specs():
            rows: list[tuple[Any, ...]] = []
            for e in batch:
                if e.type == "track" and e.event == spec.conversion_event:
                    rows.append((spec.name, e.customer_id, e.ts_ms, "", _conversion_value(e, spec)))
                    continue
                touch = touch_of(e, spec)
                if touch is not None:
                    rows.append((spec.name, e.customer_id, e.ts_ms, touch[0][:64], 0.0))
            execute_many(
                conn,
                "INSERT INTO attribution_exposures (spec, customer_id, ts_ms, channel, value) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            # Prune at most once per day of event time (the delete walks the (spec, ts) index).
            day = newest // DAY_MS
            if self._pruned_day.get(spec.name) != day:
                execute_many(
                    conn,
                    "DELETE FROM attribution_exposures WHERE spec = ? AND ts_ms < ?",
                    [(spec.name, newest - FIT_DAYS * DAY_MS)],
                )
                self._pruned_day[spec.name] = day

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        """The loser's exposures become the winner's."""
        execute_many(
            conn, "UPDATE attribution_exposures SET customer_id = ? WHERE customer_id = ?", [(winner, loser)]
        )

    def erased(self, conn: Connection, customer_id: int) -> None:
        """Forget the customer's exposures (fits hold no customer)."""
        execute_many(conn, "DELETE FROM attribution_exposures WHERE customer_id = ?", [(customer_id,)])


# --------------------------------------------------------------------------- models


def ordered_shapley_credit(
    converting: Mapping[tuple[str, ...], float], open_: Mapping[tuple[str, ...], float]
) -> dict[str, float]:
    """Ordered Shapley credit per channel from tallies of ordered distinct channel sequences.

    ``converting`` counts converting journeys per sequence (a journey's distinct
    channels in the order it first met them), ``open_`` open journeys. A prefix's
    conversion rate is over every journey that starts with it; each channel of a
    converting sequence earns its margin over the shorter prefix (clipped at 0,
    normalised per journey; an equal split when no margin is positive), exactly as
    :func:`cadence.engine.attribution.shapley.shapley_ordered` does journey by journey.

    >>> ordered_shapley_credit({("a",): 1, ("a", "b"): 2}, {("a",): 1})
    {'a': 2.5, 'b': 0.5}
    """
    journeys: dict[tuple[str, ...], float] = {}
    conversions: dict[tuple[str, ...], float] = {}
    for tally, converted in ((converting, True), (open_, False)):
        for seq, n in tally.items():
            for size in range(1, len(seq) + 1):
                prefix = seq[:size]
                journeys[prefix] = journeys.get(prefix, 0.0) + n
                if converted:
                    conversions[prefix] = conversions.get(prefix, 0.0) + n
    credit: dict[str, float] = {}
    for seq, n in converting.items():
        if not seq or n <= 0:
            continue
        rates = [conversions.get(seq[:s], 0.0) / journeys[seq[:s]] for s in range(1, len(seq) + 1)]
        margins = [max(0.0, r - (rates[i - 1] if i else 0.0)) for i, r in enumerate(rates)]
        total = sum(margins)
        shares = [m / total for m in margins] if total > 0 else [1.0 / len(seq)] * len(seq)
        for channel, share in zip(seq, shares, strict=True):
            credit[channel] = credit.get(channel, 0.0) + n * share
    return dict(sorted(credit.items()))


def _distinct(channels: Iterable[str]) -> tuple[str, ...]:
    """Channels in the order first met, each once.

    >>> _distinct(["a", "b", "a", "c", "b"])
    ('a', 'b', 'c')
    """
    return tuple(dict.fromkeys(channels))


def _open_touches(conn: Connection, spec: str) -> dict[int, list[tuple[int, str]]]:
    rows = conn.exec_driver_sql(
        dialect_sql(
            conn,
            "SELECT customer_id, ts_ms, channel FROM attribution_touches WHERE spec = ? "
            "ORDER BY customer_id, ts_ms",
        ),
        (spec,),
    ).fetchall()
    by_customer: dict[int, list[tuple[int, str]]] = {}
    for cid, ts, channel in rows:
        by_customer.setdefault(int(cid), []).append((int(ts), str(channel)))
    return by_customer


def _open_paths(touches: Mapping[int, list[tuple[int, str]]], window_days: int) -> list[list[str]]:
    """Each open journey's channels within ``window_days`` of its last touch (as the online query cuts them)."""
    paths = []
    for seq in touches.values():
        last = seq[-1][0]
        paths.append([c for ts, c in seq if last - ts <= window_days * DAY_MS])
    return paths


def _ordered_rows(
    conn: Connection, spec: str, window_days: int, open_paths: list[list[str]]
) -> list[dict[str, Any]]:
    converting: dict[tuple[str, ...], float] = {}
    for path, n in conn.exec_driver_sql(
        dialect_sql(
            conn, "SELECT path, conversions FROM attribution_paths WHERE spec = ? AND window_days = ?"
        ),
        (spec, window_days),
    ):
        seq = _distinct(c for c in str(path).split(">") if c)
        converting[seq] = converting.get(seq, 0.0) + float(n)
    open_: dict[tuple[str, ...], float] = {}
    for p in open_paths:
        if p:
            seq = _distinct(p)
            open_[seq] = open_.get(seq, 0.0) + 1.0
    credit = ordered_shapley_credit(converting, open_)
    return [{"key": c, "conversions": v, "value": None} for c, v in credit.items()]


def _exposure_log(conn: Connection, spec: str) -> TouchLog | None:
    """The causal model's input: the block's exposures of the last :data:`FIT_DAYS` days,
    and every customer seen in that period (profiles), each observed from when first seen."""
    newest = conn.exec_driver_sql(
        dialect_sql(conn, "SELECT MAX(ts_ms) FROM attribution_exposures WHERE spec = ?"), (spec,)
    ).scalar()
    if newest is None:
        return None
    seen_newest = conn.exec_driver_sql("SELECT MAX(last_seen_ms) FROM profiles").scalar()
    end = max(int(newest), int(seen_newest or 0))
    start = end - FIT_DAYS * DAY_MS
    rows = conn.exec_driver_sql(
        dialect_sql(
            conn,
            "SELECT customer_id, ts_ms, channel, value FROM attribution_exposures WHERE spec = ? AND ts_ms >= ?",
        ),
        (spec, start),
    ).fetchall()
    profiles = conn.exec_driver_sql(
        dialect_sql(conn, "SELECT customer_id, first_seen_ms FROM profiles WHERE last_seen_ms >= ?"), (start,)
    ).fetchall()
    ids: dict[int, int] = {}
    first_seen: list[int] = []
    for cid, first in profiles:
        ids[int(cid)] = len(first_seen)
        first_seen.append(max(start, int(first if first is not None else start)))
    cust = np.empty(len(rows), dtype=np.int64)
    ms = np.empty(len(rows), dtype=np.int64)
    is_conv = np.zeros(len(rows), dtype=bool)
    values = np.zeros(len(rows))
    names: dict[str, int] = {}
    chan = np.zeros(len(rows), dtype=np.int64)
    for i, (cid, ts, channel, value) in enumerate(rows):
        code = ids.get(int(cid))
        if code is None:
            code = ids[int(cid)] = len(first_seen)
            first_seen.append(start)
        cust[i] = code
        ms[i] = int(ts)
        if channel:
            chan[i] = names.setdefault(str(channel), len(names))
        else:
            is_conv[i] = True
            values[i] = float(value)
    channels = tuple(sorted(names))
    order = np.array([channels.index(n) for n in sorted(names, key=names.__getitem__)], dtype=np.int64)
    touch = ~is_conv
    return TouchLog(
        channels=channels,
        customer_ids=[str(c) for c in ids],
        touch_customer=cust[touch],
        touch_ms=ms[touch],
        touch_channel=order[chan[touch]] if order.size else chan[touch],
        conv_customer=cust[is_conv],
        conv_ms=ms[is_conv],
        conv_value=values[is_conv],
        observed_from_ms=np.array(first_seen, dtype=np.int64),
        end_ms=end,
    )


def _causal_result(log: TouchLog, spec: AttributionSpec, window_days: int) -> dict[str, Any]:
    window_ms = window_days * DAY_MS
    result = run_model(
        "causal",
        log=log,
        journeys=log.journeys(window_ms),
        window_ms=window_ms,
        params=spec.params,
        credit_rules=spec.credit_rules,
    )
    fit = result.causal
    assert fit is not None
    conversions = result.by_channel()
    values = result.by_channel(value=True)
    t0, t1 = log.period()
    return {
        "rows": [
            {"key": c, "conversions": conversions[c], "value": values[c]}
            for c in log.channels
            if c in conversions
        ],
        "share_anyway": fit.share_anyway,
        "baseline_conversions": fit.baseline_conversions,
        "expected_conversions": fit.expected_conversions,
        "observed_conversions": int(log.conv_ms.shape[0]),
        "customers": log.n_customers,
        "touches": int(log.touch_ms.shape[0]),
        "interactions": [
            {"a": a, "b": b, "conversions": v}
            for (a, b), v in sorted(fit.interactions.items(), key=lambda kv: -kv[1])
        ],
        "half_life_days": {c: fit.half_life(c) for c in fit.channels},
        "from_ms": t0,
        "to_ms": t1,
    }


@dataclass(frozen=True)
class Fit:
    """One materialised model's credit and how fresh it is."""

    spec: str
    model: str
    window_days: int
    position: int  # the last event id it reflects
    fitted_ms: int  # when it was computed (wall clock)
    data_end_ms: int  # the newest event time it saw
    seconds: float  # how long it took
    result: dict[str, Any]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Credit rows ``{"key", "conversions", "value"}``, as the online query returns them."""
        rows: list[dict[str, Any]] = self.result.get("rows", [])
        return rows

    def freshness(self) -> dict[str, Any]:
        """What the API reports about the fit (no credit rows)."""
        extra = {k: v for k, v in self.result.items() if k != "rows"}
        return {
            "position": self.position,
            "fitted_ms": self.fitted_ms,
            "data_end_ms": self.data_end_ms,
            "seconds": self.seconds,
            **extra,
        }


def _positions(conn: Connection) -> dict[str, int]:
    rows = conn.exec_driver_sql("SELECT name, position FROM checkpoints").fetchall()
    return {str(n): int(p) for n, p in rows}


def fittable(
    spec: AttributionSpec, window_days: int, models: Sequence[str] = MATERIALIZED_MODELS
) -> list[str]:
    """Those of ``models`` that can be fitted for ``spec`` at ``window_days``.

    ``causal`` is fitted from the exposures at any window; the tally models only at the
    windows whose tallies the engine loop keeps (:func:`~cadence.engine.attribution.online.kept_windows`):
    at another window they would be solved from the open journeys alone.
    """
    kept = int(window_days) in kept_windows(spec)
    return [m for m in models if kept or m not in TALLY_MODELS]


def refresh_fits(
    engine: Engine,
    *,
    spec: AttributionSpec,
    windows: Sequence[int] = DEFAULT_FIT_WINDOWS,
    models: Sequence[str] = MATERIALIZED_MODELS,
    clock_ms: int | None = None,
) -> list[Fit]:
    """Solve ``models`` for ``spec`` at every window from the stored aggregates; store and return the fits.

    The tally models are solved only at the windows whose tallies are kept (:func:`fittable`).
    Everything is read in one transaction, so a fit reflects one event-log position
    (the lower of the tallies' and the exposures' checkpoints).
    """
    unknown = [m for m in models if m not in MATERIALIZED_MODELS]
    if unknown:
        raise AttributionError(f"not a materialised model: {', '.join(unknown)}")
    bad = [w for w in windows if not 1 <= int(w) <= 90]
    if bad:
        raise AttributionError(f"windows run from 1 to 90 days, not {bad}")
    fits: list[Fit] = []
    solved: list[tuple[str, int, dict[str, Any], float]] = []
    tally_models = [m for m in models if m != "causal"]
    exposure_log: TouchLog | None = None
    with engine.begin() as conn:
        positions = _positions(conn)
        position = min(
            positions.get("attribution", 0), positions.get(EXPOSURES, positions.get("attribution", 0))
        )
        data_end = conn.exec_driver_sql(
            dialect_sql(conn, "SELECT MAX(ts_ms) FROM attribution_exposures WHERE spec = ?"), (spec.name,)
        ).scalar()
        touches = _open_touches(conn, spec.name) if tally_models else {}
        for w in sorted({int(x) for x in windows}):
            open_paths = _open_paths(touches, w)
            for model in fittable(spec, w, tally_models):
                started = time.perf_counter()
                result: dict[str, Any]
                try:
                    if model == "shapley_ordered":
                        result = {"rows": _ordered_rows(conn, spec.name, w, open_paths)}
                    else:
                        result = {"rows": _tally_model(conn, spec.name, model, w, open_paths)}
                except AttributionError as exc:  # too many channels for exact Shapley: the others still fit
                    result = {"rows": [], "note": str(exc)}
                solved.append((model, w, result, time.perf_counter() - started))
        if "causal" in models:
            started = time.perf_counter()
            exposure_log = _exposure_log(conn, spec.name)
            read_s = time.perf_counter() - started
    # The causal fits run outside the read transaction (they take seconds at scale).
    if "causal" in models:
        for w in sorted({int(x) for x in windows}):
            started = time.perf_counter()
            if exposure_log is None or exposure_log.conv_ms.size == 0:
                result = {"rows": [], "note": "no conversions among the stored exposures"}
            else:
                result = _causal_result(exposure_log, spec, w)
            solved.append(("causal", w, result, time.perf_counter() - started + read_s))
    fitted_ms = clock_ms if clock_ms is not None else int(time.time() * 1000)
    for model, w, result, seconds in solved:
        fits.append(
            Fit(
                spec=spec.name,
                model=model,
                window_days=w,
                position=position,
                fitted_ms=fitted_ms,
                data_end_ms=int(data_end or 0),
                seconds=seconds,
                result=result,
            )
        )
    with engine.begin() as conn:
        execute_many(
            conn,
            "INSERT INTO attribution_fits (spec, model, window_days, position, fitted_ms, data_end_ms, seconds, result) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (spec, model, window_days) DO UPDATE SET "
            "position = excluded.position, fitted_ms = excluded.fitted_ms, data_end_ms = excluded.data_end_ms, "
            "seconds = excluded.seconds, result = excluded.result",
            [
                (
                    f.spec,
                    f.model,
                    f.window_days,
                    f.position,
                    f.fitted_ms,
                    f.data_end_ms,
                    f.seconds,
                    dump_json(f.result),
                )
                for f in fits
            ],
        )
    return fits


def read_fits(
    conn: Connection, *, spec: str, models: Sequence[str], window_days: int | None = None
) -> dict[tuple[str, int], Fit]:
    """Stored fits of ``models`` for ``spec`` (one window, or all), keyed by (model, window)."""
    sql = "SELECT model, window_days, position, fitted_ms, data_end_ms, seconds, result FROM attribution_fits WHERE spec = ?"
    params: list[Any] = [spec]
    if window_days is not None:
        sql += " AND window_days = ?"
        params.append(window_days)
    out: dict[tuple[str, int], Fit] = {}
    for model, w, pos, fitted, end, secs, result in conn.exec_driver_sql(
        dialect_sql(conn, sql), tuple(params)
    ):
        if model not in models:
            continue
        if isinstance(result, str):
            result = orjson.loads(result)
        out[(str(model), int(w))] = Fit(
            spec, str(model), int(w), int(pos), int(fitted), int(end), float(secs), result
        )
    return out


def fitted_windows(conn: Connection, spec: str) -> list[int]:
    """Windows with at least one stored fit for ``spec``."""
    rows = conn.exec_driver_sql(
        dialect_sql(conn, "SELECT DISTINCT window_days FROM attribution_fits WHERE spec = ?"), (spec,)
    ).fetchall()
    return sorted(int(r[0]) for r in rows)


# --------------------------------------------------------------------------- the refresher


class FitRefresher:
    """Keeps the materialised fits fresh: a background thread on the leader.

    Every ``interval_s`` (or at once after :meth:`wake`), for every attribution block:
    if the event log has moved past the stored fits' position, refresh every window
    that has a fit, :data:`DEFAULT_FIT_WINDOWS`, and the windows asked for through
    :meth:`want`.
    """

    def __init__(self, runtime: Any, *, interval_s: float) -> None:
        self.runtime = runtime
        self.engine: Engine = runtime.engine
        self.interval_s = interval_s
        self.leadership = Leadership(self.engine, lock_id=REFRESH_LOCK_ID, role="attribution refresh")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.refreshes = 0
        self._wanted: set[tuple[str, int]] = set()

    def refresh_once(self, *, force: bool = False) -> list[Fit]:
        """Refresh what is stale now (everything when ``force``); return the new fits."""
        out: list[Fit] = []
        for spec in specs_of(self.runtime):
            wanted = {w for name, w in set(self._wanted) if name == spec.name}
            with read_connection(self.engine) as conn:
                windows = sorted({*fitted_windows(conn, spec.name), *DEFAULT_FIT_WINDOWS, *wanted})
                current = _positions(conn)
                position = min(
                    current.get("attribution", 0), current.get(EXPOSURES, current.get("attribution", 0))
                )
                stored = read_fits(conn, spec=spec.name, models=MATERIALIZED_MODELS)
            stale = force or any(
                (m, w) not in stored or stored[(m, w)].position < position
                for w in windows
                for m in fittable(spec, w)
            )
            if stale:
                out.extend(refresh_fits(self.engine, spec=spec, windows=windows))
            self._wanted -= {(spec.name, w) for w in wanted}
        self.refreshes += 1
        return out

    @property
    def running(self) -> bool:
        """True while the background thread runs."""
        return self._thread is not None

    def wake(self) -> None:
        """Refresh at once (the thread's next turn)."""
        self._wake.set()

    def want(self, spec: str, window_days: int) -> None:
        """Fit ``spec`` at ``window_days`` too (from now on), at once: a page asked for it."""
        self._wanted.add((spec, int(window_days)))
        self.wake()

    def start(self) -> None:
        """Run in a daemon thread until :meth:`stop`."""
        if self._thread is not None or self.interval_s <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cadence-attribution-refresh", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current refresh; release leadership."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.leadership.release()

    def _run(self) -> None:
        # Let the process start serving first; a page or request asking for a fit wakes it early.
        self._wake.wait(min(self.interval_s, STARTUP_DELAY_S))
        self._wake.clear()
        while not self._stop.is_set():
            try:
                if self.leadership.acquire():
                    self.refresh_once()
                    self.last_error = None
            except Exception as exc:  # keep refreshing: the next turn may succeed
                self.last_error = str(exc)
                log.exception("attribution refresh failed; retrying")
            self._wake.wait(self.interval_s)
            self._wake.clear()
