"""``/v1/decisions``: decide for a customer (preview or commit), in batches, and read a decision back.

The ruleset is the loaded rule files' (``runtime.extensions["rules"]``, or
``app.state.ruleset`` when set); the learners are the engine loop's
:class:`LearnerSubscriber`; the channels offered are the installed connectors'
(``app.state.available_channels`` overrides).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from cadence.api.security import Principal, Scope
from cadence.engine.campaign import CompiledRuleset
from cadence.engine.decisions_service import get_decision, make_decision
from cadence.engine.learning import LearnerSubscriber
from cadence.errors import IdentityError

router = APIRouter(prefix="/v1", tags=["decisions"])

MAX_BATCH = 1000


class TriggerEvent(BaseModel):
    """The event a triggered campaign reacts to."""

    event: str = Field(max_length=200)
    properties: dict[str, Any] = Field(default_factory=dict)
    timestamp: datetime | None = None


class DecisionRequest(BaseModel):
    """Decide for one customer."""

    customer_id: str = Field(min_length=1, max_length=200, description="user id or anonymous id")
    context: dict[str, Any] = Field(default_factory=dict)
    campaigns: list[str] | None = Field(default=None, description="only consider these campaigns")
    at: datetime | None = Field(default=None, description="decide as of this time (simulation, replay)")
    mode: Literal["preview", "commit"] = "preview"
    event: TriggerEvent | None = None


class BatchDecisionRequest(BaseModel):
    """Decide for up to 1,000 customers in one call."""

    requests: list[DecisionRequest] = Field(min_length=1, max_length=MAX_BATCH)


def _ms(at: datetime | None, request: Request) -> int:
    if at is None:
        return int(request.app.state.runtime.clock.now_ms())
    if at.tzinfo is None:
        raise HTTPException(422, detail="at: give a time zone offset, e.g. 2026-03-05T08:00:00+01:00")
    return int(at.timestamp() * 1000)


def _learners(request: Request) -> LearnerSubscriber | None:
    loop = getattr(request.app.state, "engine_loop", None)
    for sub in getattr(loop, "subscribers", ()) or ():
        if isinstance(sub, LearnerSubscriber):
            return sub
    return None


def _ruleset(request: Request) -> CompiledRuleset:
    ruleset = getattr(request.app.state, "ruleset", None)
    if ruleset is None:
        holder = getattr(request.app.state.runtime, "extensions", {}).get("rules")
        ruleset = getattr(holder, "current", None)
    if ruleset is None:
        raise HTTPException(
            503, detail="no ruleset is loaded: add rule files and restart (or reload) cadence"
        )
    return ruleset  # type: ignore[no-any-return]


def _decide_many(request: Request, items: list[DecisionRequest]) -> list[dict[str, Any]]:
    ruleset = _ruleset(request)
    learners = _learners(request)
    channels = request.app.state.available_channels
    out: list[dict[str, Any]] = []
    engine = request.app.state.runtime.engine
    with engine.begin() as conn:
        for item in items:
            now = _ms(item.at, request)
            event = None
            if item.event is not None:
                ts = int(item.event.timestamp.timestamp() * 1000) if item.event.timestamp else now
                event = {"event": item.event.event, "ts_ms": ts, "properties": item.event.properties}
            try:
                out.append(
                    make_decision(
                        conn=conn,
                        ruleset=ruleset,
                        customer_ref=item.customer_id,
                        now_ms=now,
                        available_channels=channels,
                        opt_in_channels=getattr(request.app.state, "opt_in_channels", ()),
                        learners=learners,
                        mode=item.mode,
                        context=item.context,
                        campaigns=item.campaigns,
                        event=event,
                    )
                )
            except IdentityError as exc:
                if len(items) == 1:
                    raise HTTPException(404, detail=str(exc)) from exc
                out.append({"customer_id": item.customer_id, "action": "error", "error": str(exc)})
    return out


@router.post("/decisions")
async def decide_one(
    body: DecisionRequest, request: Request, _p: Annotated[Principal, Scope("decide")]
) -> dict[str, Any]:
    """Decide which campaign, channel and time (or nothing) for one customer, with the explanation."""
    return (await run_in_threadpool(_decide_many, request, [body]))[0]


@router.post("/decisions/batch")
async def decide_batch(
    body: BatchDecisionRequest, request: Request, _p: Annotated[Principal, Scope("decide")]
) -> dict[str, Any]:
    """Decide for up to 1,000 customers; unknown customers get ``action: "error"`` in place."""
    return {"decisions": await run_in_threadpool(_decide_many, request, body.requests)}


@router.get("/decisions/{decision_id}")
async def read_decision(
    decision_id: str, request: Request, _p: Annotated[Principal, Scope("decide")]
) -> dict[str, Any]:
    """A committed decision with its outcome so far (send status, delivered/clicked/... times)."""

    def load() -> dict[str, Any] | None:
        fallback = getattr(getattr(request.app.state, "ruleset", None), "settings", None)
        zone = fallback.default_zone if fallback is not None else "UTC"
        with request.app.state.runtime.engine.connect() as conn:
            return get_decision(conn, decision_id=decision_id, fallback_zone=zone)

    found = await run_in_threadpool(load)
    if found is None:
        raise HTTPException(404, detail=f"no committed decision {decision_id!r}")
    return found
