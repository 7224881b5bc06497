"""Liveness, readiness and Prometheus metrics: the only routes without a key."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from cadence.store.db import read_connection

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """The database answers; 503 otherwise."""
    try:
        with read_connection(request.app.state.runtime.engine) as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure
        return JSONResponse(status_code=503, content={"status": "unavailable", "error": str(exc)})
    return JSONResponse(content={"status": "ready"})


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus exposition of this process's metrics."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
