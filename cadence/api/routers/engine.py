"""The engine loop inside the API process: started with the app, and its status."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from cadence.api.security import Principal, Scope
from cadence.engine.loop import EngineBehindError, EngineLoop
from cadence.store.db import read_connection
from cadence.store.schema.core import engine_quarantine, events

router = APIRouter(prefix="/v1", tags=["engine"])


def setup(app: FastAPI) -> None:
    """Build the engine loop; run it in the background when the app does background work."""
    loop = EngineLoop(app.state.runtime)
    app.state.engine_loop = loop
    app.state.wake_engine = loop.wake
    metrics = app.state.metrics

    def record(positions: dict[str, int], _count: int) -> None:
        low = min(positions.values())
        metrics.engine_position.set(low)
        # Read-only: on SQLite a plain connection's transaction takes the write lock every commit waits for.
        with read_connection(app.state.runtime.engine) as conn:
            newest = conn.scalar(select(func.max(events.c.id))) or 0
        metrics.engine_lag.set(max(0, newest - low))

    loop.on_batch.append(record)
    metrics.engine_failing.set_function(lambda: 0.0 if loop.failure is None else 1.0)

    def set_aside() -> float:
        with read_connection(app.state.runtime.engine) as conn:
            return float(conn.scalar(select(func.count()).select_from(engine_quarantine)) or 0)

    metrics.engine_set_aside.set_function(set_aside)

    def start(app: FastAPI) -> None:
        if app.state.background and app.state.settings.engine_enabled:
            # Loaded before serving, in the leader and in the followers alike: a follower otherwise
            # decided with empty learners until its first follow job (30 s), which then unpickled
            # the snapshot in a thread while requests waited for the interpreter lock (66-127 ms).
            loop.positions()
            loop.start()

    def stop(app: FastAPI) -> None:
        loop.stop()

    app.state.on_startup.append(start)
    app.state.on_shutdown.append(stop)


async def caught_up(app: FastAPI, *, hint: str = "retry") -> None:
    """Wait until the engine loop has applied every event accepted so far; 503 after the fresh timeout.

    A request that must read what its client sent just before it calls this: a ``fresh``
    decision (a simulation driving simulated time, an app right after an ``Unsubscribed``)
    reads the consent, profile and caps those events set, and this process's learners where
    its loop leads; a data request (export, erasure) finds the customer an ``identify`` just
    created and every identity linked since. ``hint`` ends the 503's detail.
    """
    try:
        await run_in_threadpool(
            app.state.engine_loop.wait_applied,
            timeout=app.state.settings.decision_fresh_timeout_seconds,
            inline=not app.state.background,
        )
    except EngineBehindError as exc:
        raise HTTPException(503, detail=f"{exc}; {hint}", headers={"Retry-After": "1"}) from exc


@router.get("/engine")
async def engine_status(request: Request, _p: Annotated[Principal, Scope("admin")]) -> dict[str, Any]:
    """Each subscriber's position in the event log, and how many events decisions here have yet to see."""
    loop: EngineLoop = request.app.state.engine_loop

    def status() -> dict[str, Any]:
        return loop.status()

    return await run_in_threadpool(status)
