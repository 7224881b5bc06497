"""Customers: privacy export and erasure, and explicit consent changes."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, StrictBool

from cadence.api.routers.engine import caught_up
from cadence.api.security import Principal, Scope
from cadence.channels import CHANNELS, channel_named
from cadence.clock import now_ms
from cadence.engine.consent import CONSENT_EVENT, consent_of
from cadence.engine.events import NewEvent
from cadence.engine.identity import resolve_customer
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop
from cadence.engine.privacy import erase_customer, export_customer
from cadence.errors import IdentityError
from cadence.store.db import read_connection

router = APIRouter(prefix="/v1", tags=["customers"])


class ConsentRequest(BaseModel):
    """Grant or refuse channels for a customer, identified by user or anonymous id."""

    user_id: str | None = Field(default=None, max_length=200)
    anonymous_id: str | None = Field(default=None, max_length=200)
    channels: dict[str, StrictBool] = Field(
        description='e.g. {"email": true, "sms": false}; "all" for every channel; names in any case'
    )
    source: str = Field(default="api", max_length=64, description="where the consent was given")


class ConsentResponse(BaseModel):
    """The customer's consent after the change."""

    customer_id: int
    consent: dict[str, dict[str, Any]]


@router.get("/customers/{ref}")
async def export(ref: str, request: Request, _p: Annotated[Principal, Scope("admin")]) -> dict[str, Any]:
    """Everything cadence holds about a customer (by user or anonymous id), for a data request."""
    await caught_up(request.app)  # a customer an identify just created, and every identity linked since
    try:
        return await run_in_threadpool(export_customer, engine=request.app.state.runtime.engine, ref=ref)
    except IdentityError as exc:
        raise HTTPException(404, detail=str(exc)) from exc


@router.delete("/customers/{ref}")
async def erase(
    ref: str, request: Request, principal: Annotated[Principal, Scope("admin")]
) -> dict[str, int]:
    """Erase a customer's events, identities and traits, and correct every derived state."""
    await caught_up(request.app)  # every identity the events accepted so far link to the customer
    try:
        return await run_in_threadpool(
            erase_customer,
            runtime=request.app.state.runtime,
            ref=ref,
            requested_by=f"api:{principal.name}",
            loop=request.app.state.engine_loop,
        )
    except IdentityError as exc:
        raise HTTPException(404, detail=str(exc)) from exc


@router.post("/consent", response_model=ConsentResponse)
async def set_consent(
    body: ConsentRequest, request: Request, _p: Annotated[Principal, Scope("ingest")]
) -> ConsentResponse:
    """Record a consent change; it is in effect when this returns.

    The change is appended to the event log as a ``Consent Updated`` event (so it
    survives replays and erasure rules), then applied at once.
    """
    if not body.user_id and not body.anonymous_id:
        raise HTTPException(422, detail="user_id or anonymous_id is required")
    # As ingest reads them (cadence.channels.channel_named): "Email" is email.
    channels = {channel_named(name): granted for name, granted in body.channels.items()}
    unknown = sorted(set(channels) - set(CHANNELS) - {"all"})
    if unknown:
        raise HTTPException(
            422, detail=f"unknown channel(s) {', '.join(unknown)}; known: {', '.join(CHANNELS)}"
        )
    now = now_ms()
    event = NewEvent(
        message_id=f"consent-{uuid.uuid4().hex}",
        type="track",
        event=CONSENT_EVENT,
        user_id=body.user_id,
        anonymous_id=body.anonymous_id,
        ts_ms=now,
        payload={"properties": {"channels": channels, "source": body.source}},
        source="api",
        received_ms=now,
    )
    runtime = request.app.state.runtime
    await run_in_threadpool(record_events, engine=runtime.engine, batch=[event])
    loop: EngineLoop = request.app.state.engine_loop
    await run_in_threadpool(loop.catch_up)

    def read() -> ConsentResponse:
        with read_connection(runtime.engine) as conn:
            cid = resolve_customer(conn, body.user_id or body.anonymous_id or "")
            assert cid is not None  # the loop just created or found them
            return ConsentResponse(customer_id=cid, consent=consent_of(conn, cid))

    return await run_in_threadpool(read)
