"""Rules over HTTP: the loaded ruleset, a hot reload, and the explain record.

* ``GET /v1/rules`` (admin): the current ruleset's hash, names and diagnostics.
* ``POST /v1/rules/reload`` (admin): reload the rule paths; the new ruleset replaces
  the old one atomically, and only when it compiles without error.
* ``GET /v1/explain/{campaign}?customer=ID[&at=ISO-8601]`` (decide): the same record
  as ``cadence explain --json``.

The ruleset lives in ``runtime.extensions["rules"]`` (a
:class:`~cadence.dsl.loader.RulesetHolder`), loaded from ``settings.rules_paths`` on
first use; other parts of the process read it from there.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from cadence.api.security import Principal, Scope
from cadence.clock import datetime_to_ms, now_ms
from cadence.dsl.explain import explain_from_database
from cadence.dsl.loader import LoadResult, RulesetHolder
from cadence.store.db import read_connection

router = APIRouter(prefix="/v1", tags=["rules"])


def setup(app: FastAPI) -> None:
    """Put a ruleset holder in the runtime's extensions (unless a part already did)."""
    runtime = app.state.runtime
    settings = app.state.settings
    runtime.extensions.setdefault(
        "rules",
        RulesetHolder(
            list(settings.rules_paths),
            available_channels=app.state.available_channels,
            default_zone=settings.default_timezone,
        ),
    )


def _holder(request: Request) -> tuple[RulesetHolder, LoadResult | None]:
    holder: RulesetHolder = request.app.state.runtime.extensions["rules"]
    result = None
    if holder.current is None:
        result = holder.reload()
    return holder, result


def _summary(holder: RulesetHolder, result: LoadResult | None) -> dict[str, Any]:
    rs = holder.current
    return {
        "hash": rs.hash if rs else None,
        "ok": result.ok if result is not None else rs is not None,
        "files": list(rs.files) if rs else [],
        "campaigns": sorted(rs.campaigns) if rs else [],
        "segments": sorted(rs.segments) if rs else [],
        "attribution": sorted(rs.attribution) if rs else [],
        "diagnostics": [d.to_dict() for d in result.diagnostics] if result is not None else [],
    }


@router.get("/rules")
async def rules(request: Request, _principal: Annotated[Principal, Scope("admin")]) -> dict[str, Any]:
    """The current ruleset (loaded on first use)."""
    holder, result = await run_in_threadpool(_holder, request)
    return _summary(holder, result)


@router.post("/rules/reload")
async def reload(request: Request, _principal: Annotated[Principal, Scope("admin")]) -> dict[str, Any]:
    """Reload the rule paths; keep the old ruleset when the new one has errors."""
    holder: RulesetHolder = request.app.state.runtime.extensions["rules"]
    result = await run_in_threadpool(holder.reload)
    return _summary(holder, result)


@router.get("/explain/{campaign}")
async def explain(
    request: Request,
    campaign: str,
    _principal: Annotated[Principal, Scope("decide")],
    customer: Annotated[str, Query(description="user id, anonymous id or numeric customer id")],
    at: Annotated[str | None, Query(description="ISO-8601 time; default now")] = None,
) -> dict[str, Any]:
    """Every condition of ``campaign`` for one customer with its actual value, and why not."""
    when = now_ms()
    if at is not None:
        try:
            parsed = datetime.fromisoformat(at.replace("Z", "+00:00"))
        except ValueError as exc:
            raise HTTPException(400, detail=f"at: {at!r} is not an ISO-8601 time") from exc
        when = datetime_to_ms(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))

    def run() -> dict[str, Any]:
        holder, _result = _holder(request)
        if holder.current is None:
            raise HTTPException(409, detail="the rules do not compile: see GET /v1/rules")
        with read_connection(request.app.state.runtime.engine) as conn:
            return explain_from_database(
                conn,
                ruleset=holder.current,
                campaign=campaign,
                customer=customer,
                now_ms=when,
                available_channels=request.app.state.available_channels,
            )

    try:
        return await run_in_threadpool(run)
    except LookupError as exc:
        raise HTTPException(404, detail=str(exc)) from exc
