"""The scheduler: jobs from the rules, runs owed and claimed, pushes, background chores.

:class:`PushScheduler` is the database-backed core; everything it does is driven by
an explicit clock, so tests move time by hand and call :meth:`PushScheduler.tick`:

1. :meth:`~PushScheduler.sync_jobs` mirrors the ruleset's scheduled campaigns into
   ``scheduled_jobs`` (a new or changed schedule owes nothing from before it was seen;
   a removed campaign's pending runs are skipped);
2. :meth:`~PushScheduler.plan` inserts a ``scheduled_runs`` row per occurrence owed
   since each job's watermark (unique by campaign and occurrence; misfires are run
   once late or skipped, as configured);
3. :meth:`~PushScheduler.run_due` claims the pending runs (and ``running`` ones whose
   owner stopped heart-beating for longer than the lease), groups those firing at
   the same instant into one push so campaigns of one tick compete per customer,
   and pushes them (:func:`cadence.scheduler.push.push`).

:class:`SchedulerService` wraps it in an APScheduler ``BackgroundScheduler`` inside
``cadence serve``: one cron job per scheduled campaign (hot-reloaded with the rule
files), plus expiry of queued sends whose campaign ended and learner snapshots. On
PostgreSQL only the process holding the scheduler's advisory lock does the work.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from cadence.clock import Clock
from cadence.engine.campaign import Campaign, CompiledRuleset, Schedule
from cadence.engine.decision import Scorer
from cadence.engine.leader import Leadership
from cadence.scheduler.occurrences import (
    CUSTOMER_ZONE,
    Misfire,
    due_zones,
    iso,
    local_label,
    next_local_run,
    plan_occurrences,
    trigger_for,
)
from cadence.scheduler.push import DueCampaign, LostRun, PushLearners, PushReport, push
from cadence.store.db import read_connection
from cadence.store.fast import dialect_insert
from cadence.store.schema.core import profiles
from cadence.store.schema.scheduler import scheduled_jobs, scheduled_runs
from cadence.store.schema.sends import sends

__all__ = ["SCHEDULER_LOCK_ID", "PushScheduler", "SchedulerConfig", "SchedulerService", "list_jobs"]

log = logging.getLogger("cadence.scheduler")

SCHEDULER_LOCK_ID = 0x0CADE9D0  # pg advisory lock held by the process that runs scheduled jobs


@dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler behaves; built from settings by :meth:`from_settings`."""

    misfire: Misfire = "run_once"
    grace_ms: int = 3_600_000
    lease_ms: int = 120_000
    chunk_size: int = 2000
    prefilter: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> SchedulerConfig:
        """From ``CADENCE_SCHEDULER_*`` settings."""
        return cls(
            misfire=settings.scheduler_misfire,
            grace_ms=int(settings.scheduler_misfire_grace_seconds * 1000),
            lease_ms=int(settings.scheduler_lease_seconds * 1000),
            chunk_size=settings.scheduler_chunk_size,
            prefilter=settings.scheduler_prefilter,
        )


def _next_run(schedule: Schedule, now_ms: int) -> int | None:
    nxt = trigger_for(schedule).get_next_fire_time(
        None, datetime.fromtimestamp(now_ms / 1000 + 0.001, tz=UTC)
    )
    return int(nxt.timestamp() * 1000) if nxt is not None else None


def scheduled_campaigns(ruleset: CompiledRuleset | None) -> dict[str, Campaign]:
    """The campaigns of ``ruleset`` that have a schedule, by name."""
    if ruleset is None:
        return {}
    return {name: c for name, c in sorted(ruleset.campaigns.items()) if c.schedule is not None}


def _stored_jobs(conn: Connection) -> dict[str, Any]:
    """The rows of ``scheduled_jobs``, by campaign."""
    return {r.campaign: r for r in conn.execute(select(scheduled_jobs))}


def _job_changes(stored: dict[str, Any], wanted: dict[str, Campaign], now: int) -> list[tuple[str, str]]:
    """What :meth:`PushScheduler.sync_jobs` writes, as ``(kind, campaign)``; empty when in step.

    ``added``: a scheduled campaign with no row; ``changed``: its schedule changed, or it came
    back to the rules; ``next``: only its next run moved; ``removed``: gone from the rules.
    Asked of a read-only snapshot first, then again under the write lock.
    """
    out = []
    for name, campaign in wanted.items():
        schedule = campaign.schedule
        assert schedule is not None
        row = stored.get(name)
        if row is None:
            out.append(("added", name))
        elif (row.cron, row.zone) != (schedule.cron, schedule.zone) or row.removed_ms is not None:
            out.append(("changed", name))
        elif row.next_run_ms != _next_run(schedule, now):
            out.append(("next", name))
    out.extend(
        ("removed", name) for name, row in stored.items() if name not in wanted and row.removed_ms is None
    )
    return out


@dataclass
class JobChanges:
    """What :meth:`PushScheduler.sync_jobs` changed."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


class PushScheduler:
    """Plans, claims and runs scheduled pushes against the database (see the module docstring).

    :param rules: returns the current ruleset (None while the rules do not compile).
    :param scorer: returns the learners' scorer, or None for deterministic decisions.
    :param learners: returns the learners that remember each pushed send (None: none do).
    :param owner: names this process in ``scheduled_runs.owner``; unique by default.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        clock: Clock,
        rules: Callable[[], CompiledRuleset | None],
        available_channels: Collection[str],
        config: SchedulerConfig | None = None,
        opt_in_channels: Collection[str] = (),
        scorer: Callable[[], Scorer | None] | None = None,
        learners: Callable[[], PushLearners | None] | None = None,
        owner: str | None = None,
        on_chunk: Callable[[PushReport], None] | None = None,
        on_run: Callable[[str, str, PushReport | None], None] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.rules = rules
        self.available_channels = tuple(available_channels)
        self.opt_in_channels = frozenset(opt_in_channels)
        self.config = config or SchedulerConfig()
        self.scorer = scorer
        self.learners = learners
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.on_chunk = on_chunk
        self.on_run = on_run
        self._lock = threading.Lock()

    # -- jobs ------------------------------------------------------------------------

    def sync_jobs(self, ruleset: CompiledRuleset | None, *, now_ms: int | None = None) -> JobChanges:
        """Mirror the ruleset's scheduled campaigns into ``scheduled_jobs``.

        Looks first in a read-only snapshot (:func:`~cadence.store.db.read_connection`): when
        the table already mirrors the rules, as on almost every tick, no write transaction
        is begun (on SQLite it would hold the write lock every decision commit waits for).
        Otherwise the rows are read again and changed under the lock.
        """
        now = self.clock.now_ms() if now_ms is None else now_ms
        wanted = scheduled_campaigns(ruleset)
        changes = JobChanges()
        with read_connection(self.engine) as conn:
            if not _job_changes(_stored_jobs(conn), wanted, now):
                return changes
        with self.engine.begin() as conn:
            stored = _stored_jobs(conn)
            for kind, name in _job_changes(stored, wanted, now):
                row = stored.get(name)
                if kind == "removed":
                    conn.execute(
                        update(scheduled_jobs)
                        .where(scheduled_jobs.c.campaign == name)
                        .values(removed_ms=now, next_run_ms=None, updated_ms=now)
                    )
                    changes.removed.append(name)
                    continue
                schedule = wanted[name].schedule
                assert schedule is not None
                nxt = _next_run(schedule, now)
                if kind == "added":
                    conn.execute(
                        dialect_insert(conn, scheduled_jobs)
                        .values(
                            campaign=name,
                            schedule=schedule.text,
                            cron=schedule.cron,
                            zone=schedule.zone,
                            registered_ms=now,
                            last_fire_ms=now,
                            next_run_ms=nxt,
                            updated_ms=now,
                        )
                        .on_conflict_do_nothing(index_elements=["campaign"])
                    )
                    changes.added.append(name)
                elif kind == "changed":
                    # A new schedule owes nothing from before it was seen.
                    conn.execute(
                        update(scheduled_jobs)
                        .where(scheduled_jobs.c.campaign == name)
                        .values(
                            schedule=schedule.text,
                            cron=schedule.cron,
                            zone=schedule.zone,
                            removed_ms=None,
                            last_fire_ms=max(row.last_fire_ms, now),
                            next_run_ms=nxt,
                            updated_ms=now,
                        )
                    )
                    changes.changed.append(name)
                else:
                    conn.execute(
                        update(scheduled_jobs)
                        .where(scheduled_jobs.c.campaign == name)
                        .values(next_run_ms=nxt, schedule=schedule.text, updated_ms=now)
                    )
            for name in changes.removed + changes.changed:
                conn.execute(
                    update(scheduled_runs)
                    .where(scheduled_runs.c.campaign == name, scheduled_runs.c.status == "pending")
                    .values(status="skipped", error="the campaign's schedule changed or it left the rules")
                )
        for kind in ("added", "changed", "removed"):
            for name in getattr(changes, kind):
                log.info("scheduled job %s %s", name, kind)
        return changes

    # -- planning --------------------------------------------------------------------

    def _zones(self, conn: Connection, default_zone: str) -> set[str]:
        found = {z for (z,) in conn.execute(select(profiles.c.timezone).distinct()) if z}
        return found | {default_zone}

    def _owed(
        self, conn: Connection, wanted: dict[str, Campaign], now: int
    ) -> list[tuple[Any, Schedule, list[Any]]]:
        """(job row, schedule, occurrences) of each job with occurrences owed up to ``now``."""
        owed = []
        for job in conn.execute(select(scheduled_jobs).where(scheduled_jobs.c.removed_ms.is_(None))):
            campaign = wanted.get(job.campaign)
            if campaign is None or campaign.schedule is None:
                continue
            plan = plan_occurrences(
                schedule=campaign.schedule,
                after_ms=job.last_fire_ms,
                now_ms=now,
                grace_ms=self.config.grace_ms,
                misfire=self.config.misfire,
            )
            if plan:
                owed.append((job, campaign.schedule, plan))
        return owed

    def plan(self, ruleset: CompiledRuleset, *, now_ms: int | None = None) -> int:
        """Insert the runs owed up to now (pending or skipped); returns how many runs are pending.

        What is owed is looked at first in a read-only snapshot: a tick between fire times
        begins no write transaction (on SQLite: does not take the write lock). When something
        is owed, the customers' zones (a scan of the profiles, for schedules in the customer's
        zone) are read there too, and the jobs are read again under the lock, so two
        schedulers never plan an occurrence twice (the rows are unique as well).
        """
        now = self.clock.now_ms() if now_ms is None else now_ms
        wanted = scheduled_campaigns(ruleset)
        created = 0
        zones: set[str] | None = None
        with read_connection(self.engine) as conn:
            owed = self._owed(conn, wanted, now)
            if not owed:
                return 0
            if any(schedule.zone == CUSTOMER_ZONE for _job, schedule, _plan in owed):
                zones = self._zones(conn, ruleset.settings.default_zone)
        with self.engine.begin() as conn:
            for job, schedule, plan in self._owed(conn, wanted, now):
                rows = []
                for occ in plan:
                    if schedule.zone == CUSTOMER_ZONE:
                        if zones is None:  # a job owed since the look
                            zones = self._zones(conn, ruleset.settings.default_zone)
                        if not due_zones(schedule, occ.fire_ms, zones):
                            continue  # nobody lives where it is time now
                    rows.append(
                        {
                            "campaign": job.campaign,
                            "occurrence": iso(occ.fire_ms),
                            "fire_ms": occ.fire_ms,
                            "status": "pending" if occ.action == "run" else "skipped",
                            "cursor": 0,
                            "evaluated": 0,
                            "enqueued": 0,
                            "late_ms": occ.late_ms,
                            "error": None
                            if occ.action == "run"
                            else "misfired: missed while no scheduler ran",
                        }
                    )
                if rows:
                    result = conn.execute(
                        dialect_insert(conn, scheduled_runs)
                        .on_conflict_do_nothing(index_elements=["campaign", "occurrence"])
                        .returning(scheduled_runs.c.status),
                        rows,
                    ).all()
                    created += sum(1 for (status,) in result if status == "pending")
                    for row in rows:
                        if row["status"] == "skipped":
                            log.warning(
                                "scheduled run %s %s skipped: misfired", row["campaign"], row["occurrence"]
                            )
                conn.execute(
                    update(scheduled_jobs)
                    .where(
                        scheduled_jobs.c.campaign == job.campaign,
                        scheduled_jobs.c.last_fire_ms < plan[-1].fire_ms,
                    )
                    .values(
                        last_fire_ms=plan[-1].fire_ms, next_run_ms=_next_run(schedule, now), updated_ms=now
                    )
                )
        return created

    # -- running ---------------------------------------------------------------------

    def _claimable(self, now: int) -> Any:
        """The condition of a run to claim at ``now``: pending, or running for an owner whose lease lapsed.

        The one place that says it: :meth:`run_due` looks for such runs in a read-only
        snapshot, and :meth:`_claim` asks it again of the row under the write lock.
        """
        stale = now - self.config.lease_ms
        return (scheduled_runs.c.status == "pending") | (
            (scheduled_runs.c.status == "running") & (scheduled_runs.c.heartbeat_ms < stale)
        )

    def _claim(self, run_id: int, fire_ms: int, now: int) -> bool:
        with self.engine.begin() as conn:
            claimed = conn.execute(
                update(scheduled_runs)
                .where(scheduled_runs.c.id == run_id, self._claimable(now))
                .values(
                    status="running",
                    owner=self.owner,
                    heartbeat_ms=now,
                    started_ms=now,
                    late_ms=now - fire_ms,
                )
            ).rowcount
        return claimed == 1

    def _finish(self, run_ids: Sequence[int], status: str, error: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(scheduled_runs)
                .where(scheduled_runs.c.id.in_(list(run_ids)), scheduled_runs.c.owner == self.owner)
                .values(status=status, error=error[:2000], finished_ms=self.clock.now_ms())
            )

    def run_due(self, ruleset: CompiledRuleset) -> list[PushReport]:
        """Claim and push every run that is pending or abandoned, one tick (fire time) at a time.

        The candidates are read in a read-only snapshot (with none, no write transaction is
        begun); each is claimed by its own write transaction that checks the row again, so
        of two schedulers racing for a run exactly one gets it.
        """
        now = self.clock.now_ms()
        with read_connection(self.engine) as conn:
            candidates = conn.execute(
                select(scheduled_runs.c.id, scheduled_runs.c.campaign, scheduled_runs.c.fire_ms)
                .where(self._claimable(now))
                .order_by(scheduled_runs.c.fire_ms, scheduled_runs.c.campaign)
            ).all()
        ticks: dict[int, list[tuple[int, str]]] = {}
        for run_id, campaign, fire_ms in candidates:
            ticks.setdefault(fire_ms, []).append((run_id, campaign))
        reports = []
        zones: set[str] | None = None
        for fire_ms, runs in ticks.items():
            due: list[DueCampaign] = []
            for run_id, name in runs:
                if not self._claim(run_id, fire_ms, self.clock.now_ms()):
                    continue  # another process has it
                campaign = ruleset.campaigns.get(name)
                schedule = campaign.schedule if campaign is not None else None
                if campaign is None or schedule is None:
                    self._finish([run_id], "skipped", "the campaign is no longer scheduled in the rules")
                    continue
                if schedule.zone == CUSTOMER_ZONE:
                    if zones is None:
                        with read_connection(self.engine) as conn:
                            zones = self._zones(conn, ruleset.settings.default_zone)
                    due.append(
                        DueCampaign(campaign, run_id, fire_ms, zones=due_zones(schedule, fire_ms, zones))
                    )
                else:
                    due.append(
                        DueCampaign(campaign, run_id, fire_ms, label=local_label(fire_ms, schedule.zone))
                    )
            if not due:
                continue
            names = ", ".join(d.campaign.name for d in due)
            log.info("push started: %s at %s", names, iso(fire_ms))
            try:
                report = push(
                    engine=self.engine,
                    ruleset=ruleset,
                    due=due,
                    owner=self.owner,
                    clock=self.clock,
                    available_channels=self.available_channels,
                    opt_in_channels=self.opt_in_channels,
                    scorer=self.scorer() if self.scorer is not None else None,
                    learners=self.learners() if self.learners is not None else None,
                    chunk_size=self.config.chunk_size,
                    on_chunk=self.on_chunk,
                    use_prefilter=self.config.prefilter,
                )
            except LostRun as exc:
                log.warning("push %s at %s taken over by another process: %s", names, iso(fire_ms), exc)
                continue
            except Exception as exc:
                log.exception("push %s at %s failed", names, iso(fire_ms))
                self._finish([d.run_id for d in due], "failed", f"{type(exc).__name__}: {exc}")
                if self.on_run is not None:
                    for d in due:
                        self.on_run(d.campaign.name, "failed", None)
                continue
            log.info(
                "push done: %s at %s: %d customers, %d sends queued in %.1fs",
                names,
                iso(fire_ms),
                report.evaluated,
                report.total_enqueued,
                report.seconds,
            )
            if self.on_run is not None:
                for d in due:
                    self.on_run(d.campaign.name, "done", report)
            reports.append(report)
        return reports

    def tick(self, *, blocking: bool = True) -> list[PushReport]:
        """Sync jobs with the current rules, plan what is owed, run it.

        With ``blocking=False`` a tick already in progress in this process makes this
        one return at once (it will have planned, or the next tick will).
        """
        if not self._lock.acquire(blocking=blocking):
            return []
        try:
            ruleset = self.rules()
            if ruleset is None:
                return []
            self.sync_jobs(ruleset)
            self.plan(ruleset)
            return self.run_due(ruleset)
        finally:
            self._lock.release()

    # -- chores ----------------------------------------------------------------------

    def expire_sends(self, ruleset: CompiledRuleset | None = None) -> int:
        """Mark ``expired`` the queued sends of campaigns that have ended; returns how many."""
        ruleset = ruleset or self.rules()
        if ruleset is None:
            return 0
        now = self.clock.now_ms()
        ended = [c.name for c in ruleset.campaigns.values() if c.ends_ms is not None and c.ends_ms <= now]
        if not ended:
            return 0
        expiring = (sends.c.status == "queued", sends.c.campaign.in_(ended))
        with read_connection(self.engine) as conn:  # an ended campaign stays in the rules: mostly none left
            if conn.execute(select(sends.c.id).where(*expiring).limit(1)).first() is None:
                return 0
        with self.engine.begin() as conn:
            count = conn.execute(
                update(sends)
                .where(*expiring)
                .values(
                    status="expired", last_error="the campaign ended before the send went out", updated_ms=now
                )
            ).rowcount
        if count:
            log.info("expired %d queued sends of ended campaigns", count)
        return int(count)


def list_jobs(engine: Engine, ruleset: CompiledRuleset | None, *, now_ms: int) -> list[dict[str, Any]]:
    """Every scheduled campaign with its schedule, next run and last run (for ``cadence jobs`` and the API).

    Jobs come from the current rules; campaigns the database knows but the rules no
    longer schedule are listed with ``removed`` set.
    """
    wanted = scheduled_campaigns(ruleset)
    with read_connection(engine) as conn:
        stored = _stored_jobs(conn)
        default_zone = ruleset.settings.default_zone if ruleset is not None else "UTC"
        zones = {z for (z,) in conn.execute(select(profiles.c.timezone).distinct()) if z} | {default_zone}
        last_runs: dict[str, Any] = {}
        for row in conn.execute(select(scheduled_runs).order_by(scheduled_runs.c.fire_ms)):
            last_runs[row.campaign] = row
    out = []
    for name in sorted(set(wanted) | set(stored)):
        campaign = wanted.get(name)
        schedule = campaign.schedule if campaign is not None else None
        job = stored.get(name)
        last = last_runs.get(name)
        if schedule is None:
            nxt = None
        elif schedule.zone == CUSTOMER_ZONE:
            nxt = next_local_run(schedule, now_ms, zones)  # the first customer due, not the next check
        else:
            nxt = _next_run(schedule, now_ms)
        out.append(
            {
                "id": f"campaign:{name}",
                "campaign": name,
                "kind": campaign.kind if campaign is not None else None,
                "schedule": schedule.text if schedule else (job.schedule if job else None),
                "cron": schedule.cron if schedule else (job.cron if job else None),
                "zone": schedule.zone if schedule else (job.zone if job else None),
                "next_run": _iso_ms(nxt),
                "next_run_ms": nxt,
                "removed": schedule is None,
                "last_run": None
                if last is None
                else {
                    "occurrence": last.occurrence,
                    "status": last.status,
                    "evaluated": last.evaluated,
                    "enqueued": last.enqueued,
                    "late_ms": last.late_ms,
                    "error": last.error,
                },
            }
        )
    return out


def _iso_ms(value: int | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value / 1000, tz=UTC).isoformat(timespec="seconds")


def _rules_signature(paths: Sequence[str | Path]) -> tuple[tuple[str, int, int], ...]:
    from cadence.dsl.loader import discover

    out = []
    for path in discover(paths):
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(out)


class SchedulerService:
    """The APScheduler ``BackgroundScheduler`` of ``cadence serve`` around a :class:`PushScheduler`.

    Jobs: ``campaign:<name>`` (one cron job per scheduled campaign; each fire runs
    :meth:`PushScheduler.tick`, which does whatever is owed), ``rules`` (reload the
    rule files when they change and re-sync the jobs), ``expire-sends``, ``compact``
    (compaction of derived state) and, when the learners run in this process,
    ``learner-snapshot`` (the leader) and ``follow`` (every process serves the pinned snapshot; the others reload the latest).
    """

    def __init__(
        self,
        core: PushScheduler,
        *,
        holder: Any,
        leadership: Leadership | None = None,
        rules_poll_seconds: float = 5.0,
        snapshot: Callable[[], Any] | None = None,
        snapshot_seconds: float = 3600.0,
        follow: Callable[[bool], Any] | None = None,
        follow_seconds: float = 10.0,
        compact: Callable[[], Any] | None = None,
        compact_seconds: float = 3600.0,
        scrub: Callable[[], Any] | None = None,
        scrub_seconds: float = 10.0,
    ) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]  # no stubs

        self.core = core
        self.holder = holder
        # A leadership given by the caller is shared (cadence serve: one leader for the engine
        # loop, the scheduler and the dispatcher) and released by its owner, not on stop().
        self._owns_leadership = leadership is None
        self.leadership = leadership or Leadership(core.engine, lock_id=SCHEDULER_LOCK_ID, role="scheduler")
        self.rules_poll_seconds = rules_poll_seconds
        self._said: str | None = None  # the rules error last logged
        self.snapshot = snapshot
        self.snapshot_seconds = snapshot_seconds
        self.follow = follow
        self.follow_seconds = follow_seconds
        self.compact = compact
        self.compact_seconds = compact_seconds
        self.scrub = scrub
        self.scrub_seconds = scrub_seconds
        apscheduler_log = logging.getLogger("apscheduler")
        if apscheduler_log.level == logging.NOTSET:
            # Its INFO lines ("Running job ...", every few seconds) would drown ours.
            apscheduler_log.setLevel(logging.WARNING)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self._synced_hash: str | None = None
        self._signature: tuple[tuple[str, int, int], ...] | None = None
        self._refresh_lock = threading.Lock()

    # -- jobs in APScheduler ----------------------------------------------------------

    def refresh(self) -> bool:
        """Reload changed rule files; when the ruleset changed, re-sync the campaign jobs. True if it did."""
        with self._refresh_lock:
            paths = getattr(self.holder, "paths", [])
            signature = _rules_signature(paths)
            if self.holder.current is None or signature != self._signature:
                self._signature = signature
                result = self.holder.reload()
                said = str(result.errors[:1]) if not result.ok else None
                if said is not None and said != self._said:  # once per error: this runs every few seconds
                    log.error("rules do not compile; keeping the current jobs: %s", said)
                self._said = said
            ruleset = self.holder.current
            digest = ruleset.hash if ruleset is not None else None
            if digest == self._synced_hash:
                return False
            self._synced_hash = digest
            wanted = scheduled_campaigns(ruleset)
            for job in self.scheduler.get_jobs():
                if job.id.startswith("campaign:") and job.id[len("campaign:") :] not in wanted:
                    job.remove()
            for name, campaign in wanted.items():
                assert campaign.schedule is not None
                self.scheduler.add_job(
                    self.fire,
                    trigger_for(campaign.schedule),
                    id=f"campaign:{name}",
                    name=f"push {name} ({campaign.schedule.text})",
                    replace_existing=True,
                    coalesce=True,
                    max_instances=1,
                    misfire_grace_time=None,
                )
            if self.leadership.acquire():
                self.core.sync_jobs(ruleset)
            log.info(
                "scheduler jobs synced with ruleset %s: %s", (digest or "-")[:12], sorted(wanted) or "none"
            )
            return True

    def fire(self) -> None:
        """A campaign job fired: if this process leads, do whatever is owed."""
        try:
            if self.leadership.acquire():
                self.core.tick(blocking=False)
        except Exception:
            log.exception("scheduled tick failed")

    def _expire(self) -> None:
        try:
            if self.leadership.acquire():
                self.core.expire_sends()
        except Exception:
            log.exception("expiring sends failed")

    def _snapshot(self) -> None:
        try:
            if self.snapshot is not None and self.leadership.acquire():
                self.snapshot()
        except Exception:
            log.exception("learner snapshot failed")

    def _scrub(self) -> None:
        try:
            if self.scrub is not None and self.leadership.acquire():
                self.scrub()
        except Exception:
            log.exception("scrubbing erased customers from the learner snapshots failed")

    def _follow(self) -> None:
        try:
            if self.follow is not None:
                self.follow(self.leadership.acquire())
        except Exception:
            log.exception("refreshing from the leader's state failed")

    def _compact(self) -> None:
        try:
            if self.compact is not None and self.leadership.acquire():
                self.compact()
        except Exception:
            log.exception("compaction failed")

    def _watch(self) -> None:
        """Every few seconds: pick up rule changes, and (leader only) do what is owed.

        Ticking here too means a process that just became leader, or a run whose
        owner died, is dealt with within seconds rather than at the next fire time.
        """
        try:
            self.refresh()
        except Exception:
            log.exception("reloading the rules failed")
        self.fire()

    def start(self) -> None:
        """Build the jobs and start the background thread (a catch-up tick runs at once)."""
        self.refresh()
        # The first poll runs at once: it catches up on what was owed while no process ran
        # (misfire policy). A one-shot job would race with shutdown inside APScheduler.
        self.scheduler.add_job(
            self._watch,
            "interval",
            seconds=self.rules_poll_seconds,
            id="rules",
            name="reload rule files; catch up",
            next_run_time=datetime.now(UTC),
        )
        self.scheduler.add_job(
            self._expire, "interval", seconds=60, id="expire-sends", name="expire sends of ended campaigns"
        )
        if self.snapshot is not None:
            self.scheduler.add_job(
                self._snapshot,
                "interval",
                seconds=self.snapshot_seconds,
                id="learner-snapshot",
                name="learner snapshot",
            )
        if self.follow is not None:
            self.scheduler.add_job(
                self._follow,
                "interval",
                seconds=self.follow_seconds,
                id="follow",
                name="serve the pinned learner snapshot; reload the latest (processes that do not lead)",
            )
        if self.scrub is not None:
            self.scheduler.add_job(
                self._scrub,
                "interval",
                seconds=self.scrub_seconds,
                id="scrub",
                name="take erased customers out of the stored learner snapshots",
            )
        if self.compact is not None:
            self.scheduler.add_job(
                self._compact,
                "interval",
                seconds=self.compact_seconds,
                id="compact",
                name="compact derived state",
            )
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the thread (a push in progress finishes its chunk first) and release leadership."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self._owns_leadership:
            self.leadership.release()

    def jobs(self) -> list[dict[str, Any]]:
        """The APScheduler jobs with their next run time."""
        return [
            {
                "id": job.id,
                "name": job.name,
                "next_run": job.next_run_time.isoformat(timespec="seconds") if job.next_run_time else None,
            }
            for job in self.scheduler.get_jobs()
        ]
