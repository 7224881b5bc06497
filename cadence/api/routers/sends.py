"""``/v1/sends``: the send queue for an operator (why a send waits), in-doubt sends, re-queue and mark sent,
and erased customers' pending removals from ad audiences (admin key)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from cadence.api.security import Principal, Scope
from cadence.connectors.operator import (
    list_in_doubt,
    list_removals,
    list_sends,
    mark_sent,
    requeue_removals,
    requeue_sends,
)
from cadence.errors import CadenceError, IdentityError

router = APIRouter(prefix="/v1/sends", tags=["sends"])


class SendIds(BaseModel):
    """Send ids to act on."""

    ids: list[int] = Field(min_length=1, max_length=10_000)
    provider_message_id: str | None = None


@router.get("")
async def list_route(
    request: Request,
    _principal: Annotated[Principal, Scope("admin")],
    status: str | None = None,
    campaign: str | None = None,
    reason: str | None = None,
    customer_id: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict[str, Any]:
    """Sends, latest change first; ``reason`` is a ``last_error`` prefix (``quiet:``, ``cap:``, ``spacing:``).

    ``customer_id`` is a user id or an anonymous id, as ``POST /v1/decisions`` takes, or the
    customer number its answers give; 404 when no customer has it.
    """
    engine = request.app.state.runtime.engine
    try:
        rows = await run_in_threadpool(
            lambda: list_sends(
                engine, status=status, campaign=campaign, reason=reason, customer=customer_id, limit=limit
            )
        )
    except IdentityError as exc:
        raise HTTPException(404, detail=str(exc)) from exc
    return {"sends": rows}


@router.get("/in-doubt")
async def in_doubt(
    request: Request,
    _principal: Annotated[Principal, Scope("admin")],
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    campaign: str | None = None,
) -> dict[str, Any]:
    """Sends dead-lettered as in doubt after an interrupted delivery, oldest first."""
    engine = request.app.state.runtime.engine
    rows = await run_in_threadpool(list_in_doubt, engine, limit=limit, campaign=campaign)
    return {"sends": rows}


@router.post("/requeue")
async def requeue(
    request: Request, body: SendIds, _principal: Annotated[Principal, Scope("admin")]
) -> dict[str, Any]:
    """Put dead-lettered sends back on the queue; ``refused`` says why others were not."""
    runtime = request.app.state.runtime
    result = await run_in_threadpool(
        lambda: requeue_sends(runtime.engine, ids=body.ids, now_ms=runtime.clock.now_ms())
    )
    return result.as_dict()


@router.post("/mark-sent")
async def mark_sent_route(
    request: Request, body: SendIds, _principal: Annotated[Principal, Scope("admin")]
) -> dict[str, Any]:
    """Record in-doubt sends the provider turned out to have as sent."""
    runtime = request.app.state.runtime
    result = await run_in_threadpool(
        lambda: mark_sent(
            runtime.engine,
            ids=body.ids,
            now_ms=runtime.clock.now_ms(),
            provider_message_id=body.provider_message_id,
        )
    )
    return result.as_dict()


@router.get("/removals")
async def removals(
    request: Request,
    _principal: Annotated[Principal, Scope("admin")],
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> dict[str, Any]:
    """Erased customers' removals from ad audiences the platform has not accepted yet, without hashes."""
    engine = request.app.state.runtime.engine
    try:
        rows = await run_in_threadpool(lambda: list_removals(engine, status=status, limit=limit))
    except CadenceError as exc:
        raise HTTPException(422, detail=str(exc)) from exc
    return {"removals": rows}


@router.post("/removals/requeue")
async def requeue_removals_route(
    request: Request, body: SendIds, _principal: Annotated[Principal, Scope("admin")]
) -> dict[str, Any]:
    """Put dead-lettered audience removals back on the queue; ``refused`` says why others were not."""
    runtime = request.app.state.runtime
    result = await run_in_threadpool(
        lambda: requeue_removals(runtime.engine, ids=body.ids, now_ms=runtime.clock.now_ms())
    )
    return result.as_dict()
