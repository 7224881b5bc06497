"""Segment-compatible ingestion: ``POST /v1/track|identify|alias|page|screen|group|batch``.

Existing Segment and RudderStack libraries can point their host here and send with the
write key as HTTP Basic user name, or (for ``navigator.sendBeacon``, which cannot set
headers) as ``writeKey`` in the JSON body. Every accepted event is committed before the
answer. Browsers on the origins in ``cors_origins`` may call these routes (see
:mod:`cadence.api.cors`).
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from cadence.api.cors import PathCORS
from cadence.api.security import Principal, check_key, presented_key
from cadence.clock import now_ms
from cadence.engine.events import NewEvent, call_warnings, parse_call
from cadence.engine.ingest import IngestResult, record_events
from cadence.errors import EventError, PayloadTooLarge

router = APIRouter(prefix="/v1", tags=["ingest"])

#: The routes a browser may call cross-origin when ``cors_origins`` allows its origin.
INGEST_PATHS = tuple(
    f"/v1/{call}" for call in ("track", "identify", "alias", "page", "screen", "group", "batch")
)


def setup(app: FastAPI) -> None:
    """Allow the configured origins to call the ingestion routes from a browser."""
    origins = app.state.settings.cors_origins
    if origins:
        app.add_middleware(PathCORS, origins=origins, paths=INGEST_PATHS)


async def ingest_principal(request: Request) -> Principal:
    """The caller, by its key in the headers or else in the body's ``writeKey`` (Segment's field)."""
    key = presented_key(request)
    if key is None:
        raw = await request.body()  # cached: the route reads the same bytes again
        if len(raw) <= request.app.state.settings.max_batch_bytes:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("writeKey"), str) and body["writeKey"]:
                key = body["writeKey"]
    return await run_in_threadpool(check_key, request, key, "ingest")


IngestPrincipal = Annotated[Principal, Depends(ingest_principal)]


class IngestWarning(BaseModel):
    """Something in an accepted call that cadence could not use (the event is stored all the same)."""

    index: int | None = None  # the batch item's (batch only)
    field: str
    warning: str


class IngestResponse(BaseModel):
    """What the log made of the request."""

    success: bool = True
    accepted: int
    duplicates: int
    warnings: list[IngestWarning] | None = None  # only when there are any


class Rejected(BaseModel):
    """One batch item that was not accepted, with the field at fault."""

    index: int
    field: str | None
    error: str


async def _body(request: Request, limit: int) -> Any:
    raw = await request.body()
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {limit} bytes", field="body")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"body: not valid JSON ({exc})", field="body") from exc


async def _store(request: Request, batch: list[NewEvent], source: str) -> IngestResult:
    engine = request.app.state.runtime.engine
    result = await run_in_threadpool(record_events, engine=engine, batch=batch)
    metrics = request.app.state.metrics
    metrics.events_accepted.labels(source).inc(result.accepted)
    metrics.events_duplicate.labels(source).inc(result.duplicates)
    wake = getattr(request.app.state, "wake_engine", None)
    if wake is not None and result.accepted:
        wake()
    return result


def _single(call_type: str) -> Any:
    async def endpoint(request: Request, _principal: IngestPrincipal) -> IngestResponse:
        body = await _body(request, request.app.state.settings.max_call_bytes)
        event = parse_call(body, received_ms=now_ms(), call_type=call_type)
        result = await _store(request, [event], "api")
        warned = [IngestWarning(field=f, warning=w) for f, w in call_warnings(body, call_type)]
        return IngestResponse(accepted=result.accepted, duplicates=result.duplicates, warnings=warned or None)

    endpoint.__name__ = f"ingest_{call_type}"
    endpoint.__doc__ = f"Record one Segment `{call_type}` call."
    return endpoint


for _call in ("track", "identify", "alias", "page", "screen", "group"):
    router.add_api_route(
        f"/{_call}",
        _single(_call),
        methods=["POST"],
        response_model=IngestResponse,
        response_model_exclude_none=True,
    )


@router.post("/batch", response_model=IngestResponse, responses={400: {"model": Rejected}})
async def ingest_batch(request: Request, _principal: IngestPrincipal) -> JSONResponse:
    """Record a Segment ``batch``: valid items are stored even when others are rejected.

    Top-level ``context`` and ``integrations`` are merged into each item. When any
    item is rejected the answer is 400 and lists each with its field; the valid
    items are committed all the same (Segment libraries do not retry a 400).
    """
    settings = request.app.state.settings
    body = await _body(request, settings.max_batch_bytes)
    if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
        raise EventError("batch: expected an object with a `batch` array", field="batch")
    items = body["batch"]
    if len(items) > settings.max_batch_events:
        raise PayloadTooLarge(
            f"batch: {len(items)} events; the limit is {settings.max_batch_events}", field="batch"
        )
    shared_context = body.get("context") if isinstance(body.get("context"), dict) else None
    received = now_ms()
    good: list[NewEvent] = []
    rejected: list[dict[str, Any]] = []
    warned: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if shared_context and isinstance(item, dict):
            item = {**item, "context": {**shared_context, **(item.get("context") or {})}}
        try:
            good.append(parse_call(item, received_ms=received, prefix=f"batch.{index}."))
        except EventError as exc:
            rejected.append({"index": index, "field": exc.field, "error": str(exc)})
            continue
        for where, warning in call_warnings(item, str(item.get("type"))):
            warned.append({"index": index, "field": f"batch.{index}.{where}", "warning": warning})
    result = await _store(request, good, "api")
    content: dict[str, Any] = {
        "success": not rejected,
        "accepted": result.accepted,
        "duplicates": result.duplicates,
    }
    if warned:
        content["warnings"] = warned
    if rejected:
        request.app.state.metrics.events_rejected.labels("api").inc(len(rejected))
        content["rejected"] = rejected
        content["error"] = f"{len(rejected)} of {len(items)} events rejected"
        return JSONResponse(status_code=400, content=content)
    return JSONResponse(content=content)
