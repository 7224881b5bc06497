"""``GET /v1/attribution``: credit by channel, campaign or day, from stored aggregates only.

Rule-based models read the credits kept per conversion; ``shapley``,
``shapley_ordered``, ``markov`` and ``causal`` read their materialised fits
(:mod:`cadence.engine.attribution.materialized`), which the leader refreshes in the
background; each answer says what event-log position and time the fit reflects.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from cadence.api.security import Principal, Scope
from cadence.engine.assignments import block_lifts
from cadence.engine.attribution.journeys import DAY_MS, AttributionError, parse_window
from cadence.engine.attribution.materialized import (
    MATERIALIZED_MODELS,
    Fit,
    FitRefresher,
    read_fits,
    refresh_fits,
)
from cadence.engine.attribution.online import (
    RULE_MODELS,
    block_named,
    kept_windows,
    query_attribution,
    specs_of,
)
from cadence.store.db import read_connection
from cadence.store.fast import dialect_sql

router = APIRouter(prefix="/v1", tags=["attribution"])

#: Every model the API serves: credited per conversion, then materialised.
API_MODELS = (*RULE_MODELS, *MATERIALIZED_MODELS)


class AttributionRow(BaseModel):
    """Credit for one channel, campaign or day."""

    key: str
    conversions: float
    value: float | None


class AttributionResponse(BaseModel):
    """Credited conversions (and value) per model, grouped as asked; how fresh each fit is."""

    spec: str
    window: str
    group_by: str
    since: date | None
    until: date | None
    models: dict[str, list[AttributionRow]]
    fits: dict[str, dict[str, Any]] = {}
    notes: list[str]


class LiftRow(BaseModel):
    """One campaign's holdout lift: customers by assigned arm, intent to treat."""

    campaign: str
    treated: int  # customers who entered a sending arm in the range
    held_out: int  # customers who entered the holdout arm in the range
    treated_rate: float  # share of them converted from their assignment to the range's end
    held_out_rate: float
    difference: float  # treated_rate - held_out_rate
    low: float  # 95% interval of the difference (Newcombe)
    high: float
    incremental: float  # difference x treated


class LiftResponse(BaseModel):
    """Holdout lift per campaign with a holdout arm, over the customers who entered its split in the range."""

    spec: str
    conversion_event: str
    since: date
    until: date
    lifts: list[LiftRow]


def setup(app: FastAPI) -> None:
    """The refresher of materialised fits, run in the background when the app does background work."""
    refresher = FitRefresher(app.state.runtime, interval_s=app.state.settings.attribution_refresh_seconds)
    app.state.attribution_refresher = refresher

    def start(app: FastAPI) -> None:
        if app.state.background and app.state.settings.engine_enabled:
            refresher.start()

    def stop(app: FastAPI) -> None:
        refresher.stop()

    app.state.on_startup.append(start)
    app.state.on_shutdown.append(stop)


def _day(d: date | None) -> int | None:
    return None if d is None else _day_of(d)


def _day_of(d: date) -> int:
    return (d - date(1970, 1, 1)).days


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def fit_report(fit: Fit, *, newest_event: int) -> dict[str, Any]:
    """A fit's freshness and summary, as the API answers it."""
    info = fit.freshness()
    info["fitted_at"] = _iso(fit.fitted_ms)
    info["data_end"] = _iso(fit.data_end_ms) if fit.data_end_ms else None
    info["events_behind"] = max(0, newest_event - fit.position)
    for key in ("from_ms", "to_ms"):
        if isinstance(info.get(key), int):
            info[key.replace("_ms", "")] = _iso(info.pop(key))
    return info


@router.get("/attribution", response_model=AttributionResponse)
async def get_attribution(
    request: Request,
    _p: Annotated[Principal, Scope("admin")],
    model: Annotated[list[str] | None, Query(description=f"repeatable: {', '.join(API_MODELS)}")] = None,
    window: str = "30d",
    since: Annotated[date | None, Query(alias="from")] = None,
    until: Annotated[date | None, Query(alias="to")] = None,
    group_by: Literal["channel", "campaign", "day"] = "channel",
    spec: str | None = None,
    refresh: Annotated[bool, Query(description="refit materialised models now, before answering")] = False,
) -> dict[str, Any]:
    """Credit per model from incrementally maintained aggregates and materialised fits (no history scan)."""
    try:
        window_ms = parse_window(window)
    except AttributionError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    if window_ms % DAY_MS:
        raise HTTPException(status_code=422, detail=f"window {window}: windows are whole days (1d to 90d)")
    window_days = window_ms // DAY_MS
    if since is not None and until is not None and since > until:
        raise HTTPException(status_code=422, detail=f"from {since} is after to {until}")
    models = [m.strip() for value in (model or ["last_touch"]) for m in value.split(",") if m.strip()]
    unknown = [m for m in models if m not in API_MODELS]
    if unknown:
        raise HTTPException(
            status_code=422, detail=f"unknown model {unknown[0]!r} (choose from {', '.join(API_MODELS)})"
        )
    materialized = [m for m in models if m in MATERIALIZED_MODELS]
    if materialized and group_by != "channel":
        raise HTTPException(
            status_code=422,
            detail=f"{', '.join(materialized)}: materialised models are credited by channel: group_by must be channel",
        )
    runtime = request.app.state.runtime
    engine = runtime.engine
    specs = {s.name: s for s in specs_of(runtime)}
    try:
        block = spec = block_named(runtime, spec).name
    except AttributionError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    # Rule credits and Shapley/Markov tallies exist only for the kept windows; causal fits any.
    unkept = [m for m in models if m != "causal" and window_days not in kept_windows(specs[block])]
    if unkept:
        kept = ", ".join(f"{w}d" for w in kept_windows(specs[block]))
        raise HTTPException(
            status_code=422,
            detail=f"window {window_days}d: {', '.join(unkept)} credit is kept for the windows {kept} only "
            "(causal fits any window from 1d to 90d)",
        )

    def run() -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
        rule = [m for m in models if m in RULE_MODELS]
        with read_connection(engine) as conn:
            result = (
                query_attribution(
                    conn,
                    spec=block,
                    models=rule,
                    window_days=window_days,
                    since_day=_day(since),
                    until_day=_day(until),
                    group_by=group_by,
                )
                if rule
                else {}
            )
            fits = read_fits(conn, spec=block, models=materialized, window_days=window_days)
        missing = [m for m in materialized if (m, window_days) not in fits]
        if materialized and (refresh or missing):
            todo = materialized if refresh else missing
            for fit in refresh_fits(engine, spec=specs[block], windows=[window_days], models=todo):
                fits[(fit.model, fit.window_days)] = fit
        with read_connection(engine) as conn:
            newest = int(conn.exec_driver_sql(dialect_sql(conn, "SELECT MAX(id) FROM events")).scalar() or 0)
        reports = {}
        for m in materialized:
            fit = fits[(m, window_days)]
            result[m] = fit.rows
            reports[m] = fit_report(fit, newest_event=newest)
        return {m: result[m] for m in models}, reports

    try:
        result, reports = await run_in_threadpool(run)
    except AttributionError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    notes = []
    if materialized:
        notes.append(
            f"{', '.join(materialized)}: materialised fits (see fits: position, fitted_at, events_behind); "
            "the date range does not apply (shapley, shapley_ordered, markov: all-time tallies; "
            "causal: the last 90 days of exposures)"
        )
    return {
        "spec": spec,
        "window": f"{window_days}d",
        "group_by": group_by,
        "since": since,
        "until": until,
        "models": result,
        "fits": reports,
        "notes": notes,
    }


@router.get("/attribution/lift", response_model=LiftResponse)
async def get_lift(
    request: Request,
    _p: Annotated[Principal, Scope("admin")],
    since: Annotated[
        date | None, Query(alias="from", description="first UTC day (default: 29 days before to)")
    ] = None,
    until: Annotated[date | None, Query(alias="to", description="last UTC day (default: today)")] = None,
    spec: Annotated[str | None, Query(description="attribution block whose conversions count")] = None,
) -> dict[str, Any]:
    """Measured lift of each campaign with a holdout arm (as the dashboard's attribution page shows it).

    The customers who first entered the campaign's split (either arm, sent or not) on the days
    ``from`` to ``to``; *converted*: a conversion of the block from their assignment to the end of ``to``.
    """
    until = until or datetime.now(UTC).date()
    since = since or until - timedelta(days=29)
    if since > until:
        raise HTTPException(status_code=422, detail=f"from {since} is after to {until}")
    runtime = request.app.state.runtime
    try:
        block = block_named(runtime, spec)
    except AttributionError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None

    def run() -> list[dict[str, Any]]:
        with read_connection(runtime.engine) as conn:
            return block_lifts(conn, block, since_day=_day_of(since), until_day=_day_of(until))

    return {
        "spec": block.name,
        "conversion_event": block.conversion_event,
        "since": since,
        "until": until,
        "lifts": await run_in_threadpool(run),
    }
