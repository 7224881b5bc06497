"""The scheduler inside the API process: started with the app (leader only), and ``GET /v1/jobs``.

``setup(app)`` builds a :class:`~cadence.scheduler.service.SchedulerService` over the
ruleset holder of :mod:`cadence.api.routers.rules` and registers its Prometheus
metrics; the app's startup hook starts it when the app does background work and
``scheduler_enabled`` is set. On PostgreSQL every process builds it, but only the
one holding the scheduler's advisory lock pushes.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from prometheus_client import Counter, Gauge

from cadence.api.security import Principal, Scope
from cadence.dsl.loader import RulesetHolder
from cadence.engine.decision import Scorer
from cadence.engine.learning import scrub_snapshots, snapshot_marker, snapshot_position
from cadence.scheduler.compaction import compact_derived_state
from cadence.scheduler.needs import needs_of_holder
from cadence.scheduler.push import PushReport
from cadence.scheduler.service import PushScheduler, SchedulerConfig, SchedulerService, list_jobs
from cadence.store.db import read_connection

router = APIRouter(prefix="/v1", tags=["scheduler"])
log = logging.getLogger("cadence.scheduler")


def _learners(app: FastAPI) -> Any:
    loop = getattr(app.state, "engine_loop", None)
    for sub in getattr(loop, "subscribers", ()):
        if getattr(sub, "name", None) == "learners" and hasattr(sub, "scorer"):
            return sub
    return None


def setup(app: FastAPI) -> None:
    """Build the scheduler and its metrics; start and stop it with the app."""
    runtime = app.state.runtime
    settings = app.state.settings
    holder: RulesetHolder = runtime.extensions.setdefault(
        "rules",
        RulesetHolder(
            list(settings.rules_paths),
            available_channels=app.state.available_channels,
            default_zone=settings.default_timezone,
        ),
    )
    registry = app.state.metrics.registry
    evaluated = Counter(
        "cadence_push_customers_evaluated_total", "Customers evaluated by scheduled pushes", registry=registry
    )
    enqueued = Counter(
        "cadence_push_sends_enqueued_total",
        "Sends queued by scheduled pushes",
        ["campaign"],
        registry=registry,
    )
    runs = Counter(
        "cadence_scheduled_runs_total",
        "Scheduled runs finished, by outcome",
        ["campaign", "status"],
        registry=registry,
    )
    cursor = Gauge(
        "cadence_push_cursor", "Last customer id pushed by the push in progress", registry=registry
    )
    seen: dict[str, int] = {"evaluated": 0}
    seen_campaign: dict[str, int] = {}

    def on_chunk(report: PushReport) -> None:
        evaluated.inc(report.evaluated - seen["evaluated"])
        seen["evaluated"] = report.evaluated
        for name, count in report.enqueued.items():
            enqueued.labels(name).inc(count - seen_campaign.get(name, 0))
            seen_campaign[name] = count
        cursor.set(report.cursor)

    def on_run(campaign: str, status: str, _report: PushReport | None) -> None:
        runs.labels(campaign, status).inc()
        seen["evaluated"] = 0
        seen_campaign.clear()

    def scorer() -> Scorer | None:
        learners = _learners(app)
        return learners.scorer() if learners is not None else None

    def snapshot() -> None:
        loop = getattr(app.state, "engine_loop", None)
        if loop is not None:
            loop.snapshot_in_memory(owed_only=False)

    def follow(leading: bool) -> None:
        # A process that does not lead serves decisions from the leader's latest snapshot; every
        # process serves the pinned one (cadence models pin / rollback / unpin).
        loop = getattr(app.state, "engine_loop", None)
        learners = _learners(app)
        if loop is None or learners is None:
            return
        if leading:
            with read_connection(runtime.engine) as conn, loop._lock:
                learners.refresh_pinned(conn)
            return
        # Read-only: on SQLite a plain connection's transaction takes the write lock every commit waits for.
        with read_connection(runtime.engine) as conn:
            marker = snapshot_marker(conn, name=learners.name)
            latest = snapshot_position(conn, name=learners.name, version=marker[0])
        # Compared with the snapshots the learners last loaded (not with this job's last look): the
        # first look after start-up found the snapshot loaded at start-up and reloaded it all the
        # same, 130 ms of unpickling that held the interpreter lock under the event loop (session 12).
        loaded = getattr(learners, "loaded_marker", None)
        if marker != loaded:
            with loop._lock:
                # The loop applies the log to this process's learners after the leader (follow_in_memory):
                # a newer snapshot is loaded only when it is ahead of them, or when another is pinned.
                ahead = latest is not None and latest > loop.positions()[learners.name]
                if loaded is None or marker[1] != loaded[1] or ahead:
                    # Positions are reloaded with the snapshot, so taking over later replays from there.
                    loop._positions = None
                    loop.positions()
                else:
                    learners.loaded_marker = marker

    def scrub() -> None:
        # Erased customers out of the stored learner snapshots (see LearnerSubscriber.erased).
        scrub_snapshots(runtime.engine)

    def compact() -> None:
        report = compact_derived_state(
            engine=runtime.engine,
            clock=runtime.clock,
            settings=settings,
            needs=needs_of_holder(holder),
        )
        if report.total:
            log.info("compaction: %s", report.summary())

    loop = getattr(app.state, "engine_loop", None)
    core = PushScheduler(
        engine=runtime.engine,
        clock=runtime.clock,
        rules=lambda: holder.current,
        available_channels=app.state.available_channels,
        opt_in_channels=app.state.opt_in_channels,
        config=SchedulerConfig.from_settings(settings),
        scorer=scorer,
        learners=lambda: _learners(app),
        on_chunk=on_chunk,
        on_run=on_run,
    )
    service = SchedulerService(
        core,
        holder=holder,
        rules_poll_seconds=settings.scheduler_rules_poll_seconds,
        snapshot=snapshot,
        # One leader for everything: the engine loop's lock also gates the scheduler and dispatcher.
        leadership=loop.leadership if loop is not None else None,
        follow=follow,
        follow_seconds=settings.learner_refresh_seconds,
        compact=compact if settings.compaction_enabled else None,
        scrub=scrub,
        compact_seconds=settings.compaction_interval_seconds,
    )
    app.state.scheduler = service

    async def start(app: FastAPI) -> None:
        if app.state.background and settings.scheduler_enabled:
            await run_in_threadpool(service.start)

    async def stop(app: FastAPI) -> None:
        await run_in_threadpool(service.stop)

    app.state.on_startup.append(start)
    app.state.on_shutdown.append(stop)


@router.get("/jobs")
async def jobs(request: Request, _principal: Annotated[Principal, Scope("admin")]) -> dict[str, Any]:
    """Every scheduled campaign with its next and last run, and the scheduler's own jobs."""
    service: SchedulerService = request.app.state.scheduler

    def collect() -> dict[str, Any]:
        holder = service.holder
        if holder.current is None:
            holder.reload()
        now = request.app.state.runtime.clock.now_ms()
        return {
            "running": service.scheduler.running,
            "leader": service.leadership.held and service.scheduler.running,
            "pid": os.getpid(),
            "campaigns": list_jobs(service.core.engine, holder.current, now_ms=now),
            "background": service.jobs() if service.scheduler.running else [],
        }

    return await run_in_threadpool(collect)
