"""Compaction: delete derived state that no rule, model or query can use any more.

The event log is the source of truth; everything else is derived from it, and some
of it only ever grows. :func:`compact_derived_state` deletes, table by table:

``profile_daily``
    day buckets older than the longest window the loaded rules read on that event
    (:mod:`cadence.scheduler.needs`), and never younger than
    ``compaction_profile_days`` (400: what a scheduled push reads, and room for a
    rule added later). Buckets of an event some rule reads over all of history
    (``count(x)``) are kept; so is everything when the rules cannot be analysed.
``attribution_touches``
    touches more than 90 days (the longest attribution window) older than the same
    customer's newest touch: no conversion, journey or Markov path can reach them
    (the engine loop drops them too, at the customer's next event). With
    ``compaction_journey_days`` set, open journeys idle that long are dropped as
    well (Markov then stops counting them as journeys that did not convert).
``sends``
    finished rows (sent, failed, suppressed, expired) last touched before
    ``compaction_sends_days`` and before the longest cap window or the 35 days of
    send history decisions read, whichever is longest.
``scheduled_runs``
    finished runs older than the same horizon, except each campaign's latest
    (``cadence jobs`` shows it); the job's watermark keeps them from being owed again.
``learner_snapshots``
    unpinned snapshots beyond the newest ``compaction_snapshots_kept`` per learner.
``events``
    only with ``event_retention_days`` set: events older than that which every
    engine-loop subscriber has applied and the latest learner snapshot reflects.

Each table is cleaned in short transactions that take the engine loop's batch lock
(the advisory transaction lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so a
concurrent loop batch and a compaction never interleave. Running it twice deletes
nothing the second time; ``dry_run=True`` counts instead of deleting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine

from cadence.clock import Clock
from cadence.engine.campaign import DAY_MS
from cadence.engine.loop import lock_batches
from cadence.scheduler.needs import RuleNeeds
from cadence.store.db import read_connection
from cadence.store.fast import dialect_sql

__all__ = ["CompactionPolicy", "CompactionReport", "compact_derived_state"]

log = logging.getLogger("cadence.compaction")

#: The longest attribution window: touches further back than this before a customer's newest are unreachable.
JOURNEY_KEEP_MS = 90 * DAY_MS
#: Decisions read this much send history (caps, spacing).
SEND_HISTORY_MS = 35 * DAY_MS
#: Rows deleted per transaction (keeps the engine loop waiting at most a moment).
CHUNK_CUSTOMERS = 5000
FINISHED_SENDS = ("sent", "failed", "suppressed", "expired")
FINISHED_RUNS = ("done", "skipped", "failed")


@dataclass(frozen=True)
class CompactionPolicy:
    """How much to keep; built from settings by :meth:`from_settings`."""

    profile_days: int = 400
    sends_days: int = 90
    snapshots_kept: int = 5
    journey_days: int | None = None
    event_retention_days: int | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> CompactionPolicy:
        """From ``CADENCE_COMPACTION_*`` and ``CADENCE_EVENT_RETENTION_DAYS``."""
        return cls(
            profile_days=settings.compaction_profile_days,
            sends_days=settings.compaction_sends_days,
            snapshots_kept=settings.compaction_snapshots_kept,
            journey_days=settings.compaction_journey_days,
            event_retention_days=settings.event_retention_days,
        )


@dataclass
class CompactionReport:
    """Rows deleted (or, in a dry run, that would be) per table, and why some were kept."""

    dry_run: bool = False
    deleted: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        """Rows deleted over every table."""
        return sum(self.deleted.values())

    def summary(self) -> str:
        """One line: ``profile_daily=12 sends=3 ...``.

        >>> CompactionReport(deleted={"sends": 3, "events": 0}).summary()
        'sends=3 events=0'
        """
        return " ".join(f"{table}={count}" for table, count in self.deleted.items())


def _run(conn: Connection, sql: str, params: Sequence[Any], *, dry_run: bool) -> int:
    """Delete (or count, in a dry run) the rows ``DELETE FROM table WHERE ...`` names."""
    if dry_run:
        head, _, where = sql.partition(" WHERE ")
        table = head.removeprefix("DELETE FROM ").strip()
        sql = f"SELECT COUNT(*) FROM {table} WHERE {where}"
        return int(conn.exec_driver_sql(dialect_sql(conn, sql), tuple(params)).scalar() or 0)
    return int(conn.exec_driver_sql(dialect_sql(conn, sql), tuple(params)).rowcount or 0)


def _in_chunks(
    engine: Engine, table: str, key: str, step: Callable[[Connection, int, int], int], chunk: int
) -> int:
    """Run ``step(conn, lo, hi)`` over ``key`` ranges of ``table``, one locked transaction each."""
    with read_connection(engine) as conn:
        bounds = conn.exec_driver_sql(f"SELECT MIN({key}), MAX({key}) FROM {table}").one()
    if bounds[0] is None:
        return 0
    total = 0
    lo = int(bounds[0])
    while lo <= int(bounds[1]):
        hi = lo + chunk - 1
        with engine.begin() as conn:
            lock_batches(conn)
            total += step(conn, lo, hi)
        lo = hi + 1
    return total


def _profile_daily(
    engine: Engine, needs: RuleNeeds, policy: CompactionPolicy, now_ms: int, report: CompactionReport
) -> int:
    if needs.everything:
        report.notes.append("profile_daily: the rules could not be analysed; every bucket kept")
        return 0
    # One day more than asked: a window reaches into the day it starts in.
    keep_days = max(policy.profile_days, needs.longest_days() + 1) + 1
    cutoff_day = now_ms // DAY_MS - keep_days
    kept = needs.unbounded()
    if kept:
        report.notes.append(f"profile_daily: read over all history, kept whole: {', '.join(kept)}")
    report.notes.append(f"profile_daily: buckets before day {cutoff_day} ({keep_days} days back) dropped")
    marks = ", ".join("?" for _ in kept)
    where = "customer_id BETWEEN ? AND ? AND day < ?" + (f" AND event NOT IN ({marks})" if kept else "")

    def step(conn: Connection, lo: int, hi: int) -> int:
        return _run(
            conn,
            f"DELETE FROM profile_daily WHERE {where}",
            (lo, hi, cutoff_day, *kept),
            dry_run=report.dry_run,
        )

    return _in_chunks(engine, "profile_daily", "customer_id", step, CHUNK_CUSTOMERS)


def _touches(engine: Engine, policy: CompactionPolicy, now_ms: int, report: CompactionReport) -> int:
    # Unreachable: more than the longest window before the same journey's newest touch.
    unreachable = (
        "DELETE FROM attribution_touches WHERE customer_id BETWEEN ? AND ? AND id IN ("
        "SELECT t.id FROM attribution_touches t JOIN (SELECT spec, customer_id, MAX(ts_ms) AS newest"
        " FROM attribution_touches WHERE customer_id BETWEEN ? AND ? GROUP BY spec, customer_id) j"
        " ON t.spec = j.spec AND t.customer_id = j.customer_id WHERE t.ts_ms < j.newest - ?)"
    )
    idle = (
        "DELETE FROM attribution_touches WHERE customer_id BETWEEN ? AND ? AND id IN ("
        "SELECT t.id FROM attribution_touches t JOIN (SELECT spec, customer_id, MAX(ts_ms) AS newest"
        " FROM attribution_touches WHERE customer_id BETWEEN ? AND ? GROUP BY spec, customer_id) j"
        " ON t.spec = j.spec AND t.customer_id = j.customer_id WHERE j.newest < ?)"
    )

    def step(conn: Connection, lo: int, hi: int) -> int:
        n = _run(conn, unreachable, (lo, hi, lo, hi, JOURNEY_KEEP_MS), dry_run=report.dry_run)
        if policy.journey_days is not None:
            cutoff = now_ms - policy.journey_days * DAY_MS
            n += _run(conn, idle, (lo, hi, lo, hi, cutoff), dry_run=report.dry_run)
        return n

    return _in_chunks(engine, "attribution_touches", "customer_id", step, CHUNK_CUSTOMERS)


def _history_cutoff(needs: RuleNeeds, policy: CompactionPolicy, now_ms: int) -> int:
    keep_ms = max(policy.sends_days * DAY_MS, SEND_HISTORY_MS, needs.cap_ms) + DAY_MS
    return now_ms - keep_ms


def _sends(
    engine: Engine, needs: RuleNeeds, policy: CompactionPolicy, now_ms: int, report: CompactionReport
) -> int:
    cutoff = _history_cutoff(needs, policy, now_ms)
    marks = ", ".join("?" for _ in FINISHED_SENDS)
    sql = f"DELETE FROM sends WHERE id BETWEEN ? AND ? AND status IN ({marks}) AND updated_ms < ? AND due_ms < ?"

    def step(conn: Connection, lo: int, hi: int) -> int:
        return _run(conn, sql, (lo, hi, *FINISHED_SENDS, cutoff, cutoff), dry_run=report.dry_run)

    return _in_chunks(engine, "sends", "id", step, 20_000)


def _runs(
    engine: Engine, needs: RuleNeeds, policy: CompactionPolicy, now_ms: int, report: CompactionReport
) -> int:
    cutoff = _history_cutoff(needs, policy, now_ms)
    marks = ", ".join("?" for _ in FINISHED_RUNS)
    sql = (
        f"DELETE FROM scheduled_runs WHERE status IN ({marks}) AND fire_ms < ? AND id NOT IN ("
        "SELECT r.id FROM scheduled_runs r JOIN (SELECT campaign, MAX(fire_ms) AS latest FROM scheduled_runs"
        " GROUP BY campaign) l ON r.campaign = l.campaign AND r.fire_ms = l.latest)"
    )
    with engine.begin() as conn:
        lock_batches(conn)
        return _run(conn, sql, (*FINISHED_RUNS, cutoff), dry_run=report.dry_run)


def _snapshots(engine: Engine, policy: CompactionPolicy, report: CompactionReport) -> int:
    total = 0
    with engine.begin() as conn:
        lock_batches(conn)
        names = [r[0] for r in conn.exec_driver_sql("SELECT DISTINCT name FROM learner_snapshots")]
        for name in names:
            versions = [
                int(r[0])
                for r in conn.exec_driver_sql(
                    dialect_sql(
                        conn,
                        "SELECT version FROM learner_snapshots WHERE name = ? AND pinned = ? ORDER BY version DESC",
                    ),
                    (name, False),
                )
            ]
            if len(versions) <= policy.snapshots_kept:
                continue
            oldest_kept = versions[policy.snapshots_kept - 1]
            total += _run(
                conn,
                "DELETE FROM learner_snapshots WHERE name = ? AND pinned = ? AND version < ?",
                (name, False, oldest_kept),
                dry_run=report.dry_run,
            )
    return total


def _events(engine: Engine, policy: CompactionPolicy, now_ms: int, report: CompactionReport) -> int:
    if policy.event_retention_days is None:
        return 0
    cutoff = now_ms - policy.event_retention_days * DAY_MS
    with read_connection(engine) as conn:
        applied = conn.exec_driver_sql("SELECT MIN(position) FROM checkpoints").scalar()
        # A restart loads the latest snapshot of each learner and replays the log after it.
        snapshot = conn.exec_driver_sql(
            "SELECT MIN(position) FROM learner_snapshots s WHERE version ="
            " (SELECT MAX(version) FROM learner_snapshots l WHERE l.name = s.name)"
        ).scalar()
    bound = min(int(applied or 0), int(snapshot) if snapshot is not None else int(applied or 0))
    report.notes.append(f"events: older than {policy.event_retention_days} days and at or before id {bound}")

    def step(conn: Connection, lo: int, hi: int) -> int:
        return _run(
            conn,
            "DELETE FROM events WHERE id BETWEEN ? AND ? AND id <= ? AND ts_ms < ?",
            (lo, hi, bound, cutoff),
            dry_run=report.dry_run,
        )

    return _in_chunks(engine, "events", "id", step, 50_000)


def compact_derived_state(
    *,
    engine: Engine,
    clock: Clock,
    policy: CompactionPolicy | None = None,
    settings: Any = None,
    needs: RuleNeeds,
    dry_run: bool = False,
) -> CompactionReport:
    """Delete (or with ``dry_run`` count) what no rule, model or query can use any more.

    :param policy: how much to keep; from ``settings`` when not given.
    :param needs: what the loaded rules read (:func:`cadence.scheduler.needs.needs_of_holder`).
    """
    if policy is None:
        policy = CompactionPolicy.from_settings(settings) if settings is not None else CompactionPolicy()
    started = time.perf_counter()
    now = clock.now_ms()
    report = CompactionReport(dry_run=dry_run)
    report.deleted["profile_daily"] = _profile_daily(engine, needs, policy, now, report)
    report.deleted["attribution_touches"] = _touches(engine, policy, now, report)
    report.deleted["sends"] = _sends(engine, needs, policy, now, report)
    report.deleted["scheduled_runs"] = _runs(engine, needs, policy, now, report)
    report.deleted["learner_snapshots"] = _snapshots(engine, policy, report)
    report.deleted["events"] = _events(engine, policy, now, report)
    report.seconds = time.perf_counter() - started
    return report
