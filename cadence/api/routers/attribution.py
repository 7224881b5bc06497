"""``GET /v1/attribution``: credit by channel, campaign or day, from the aggregates only."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from cadence.api.security import Principal, Scope
from cadence.engine.attribution.journeys import DAY_MS, AttributionError, parse_window
from cadence.engine.attribution.online import ONLINE_MODELS, query_attribution, specs_of

router = APIRouter(prefix="/v1", tags=["attribution"])


class AttributionRow(BaseModel):
    """Credit for one channel, campaign or day."""

    key: str
    conversions: float
    value: float | None


class AttributionResponse(BaseModel):
    """Credited conversions (and value) per model, grouped as asked."""

    spec: str
    window: str
    group_by: str
    since: date | None
    until: date | None
    models: dict[str, list[AttributionRow]]
    notes: list[str]


def _day(d: date | None) -> int | None:
    return None if d is None else (d - date(1970, 1, 1)).days


@router.get("/attribution", response_model=AttributionResponse)
async def get_attribution(
    request: Request,
    _p: Annotated[Principal, Scope("admin")],
    model: Annotated[list[str] | None, Query(description=f"repeatable: {', '.join(ONLINE_MODELS)}")] = None,
    window: str = "30d",
    since: Annotated[date | None, Query(alias="from")] = None,
    until: Annotated[date | None, Query(alias="to")] = None,
    group_by: Literal["channel", "campaign", "day"] = "channel",
    spec: str | None = None,
) -> dict[str, Any]:
    """Credit per model from incrementally maintained aggregates (no history scan)."""
    try:
        window_days = round(parse_window(window) / DAY_MS)
    except AttributionError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    models = [m.strip() for value in (model or ["last_touch"]) for m in value.split(",") if m.strip()]
    runtime = request.app.state.runtime
    engine = runtime.engine
    if spec is None:
        spec = specs_of(runtime)[0].name
    block = spec

    def run() -> dict[str, list[dict[str, Any]]]:
        with engine.connect() as conn:
            return query_attribution(
                conn,
                spec=block,
                models=models,
                window_days=window_days,
                since_day=_day(since),
                until_day=_day(until),
                group_by=group_by,
            )

    try:
        result = await run_in_threadpool(run)
    except AttributionError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    notes = []
    if any(m in ("shapley", "markov") for m in models):
        notes.append("shapley and markov are solved from all-time tallies; the date range does not apply")
    return {
        "spec": spec,
        "window": f"{window_days}d",
        "group_by": group_by,
        "since": since,
        "until": until,
        "models": result,
        "notes": notes,
    }
