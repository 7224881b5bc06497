"""Scheduler state: the recurring jobs, each run of them, and synced audience members.

``scheduled_jobs`` has one row per campaign with a ``schedule``: its crontab, zone,
when cadence first saw it (runs before that are never owed) and its next run, so any
worker (not only the leader) can list jobs. ``scheduled_runs`` has one row per
campaign and occurrence, unique, so two processes racing on the same run agree on
one owner and a restart neither loses nor repeats a run: ``running`` rows carry the
owner, a heartbeat and the cursor (last customer id pushed), so another process may
resume a run whose owner died. ``audience_members`` is what an audience-type
campaign last synced to the ad platform, so the next run sends only the difference.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from cadence.store.schema.base import Id, metadata

__all__ = ["RUN_STATUSES", "audience_members", "scheduled_jobs", "scheduled_runs"]

RUN_STATUSES = ("pending", "running", "done", "skipped", "failed")

scheduled_jobs = Table(
    "scheduled_jobs",
    metadata,
    Column("campaign", String(200), primary_key=True),
    Column("schedule", String(200), nullable=False),  # as written in the rule file
    Column("cron", String(100), nullable=False),
    Column("zone", String(64), nullable=False),  # a zone name, or "customer"
    Column("registered_ms", BigInteger, nullable=False),
    Column("last_fire_ms", BigInteger, nullable=False),  # occurrences up to here are planned
    Column("next_run_ms", BigInteger),
    Column("removed_ms", BigInteger),  # the campaign (or its schedule) left the rules
    Column("updated_ms", BigInteger, nullable=False),
)

scheduled_runs = Table(
    "scheduled_runs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("campaign", String(200), nullable=False),
    Column("occurrence", String(64), nullable=False),  # the fire time, ISO-8601 UTC
    Column("fire_ms", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("owner", String(100)),
    Column("cursor", BigInteger, nullable=False, default=0),  # last customer id pushed
    Column("evaluated", BigInteger, nullable=False, default=0),
    Column("enqueued", BigInteger, nullable=False, default=0),
    Column("late_ms", BigInteger, nullable=False, default=0),
    Column("started_ms", BigInteger),
    Column("heartbeat_ms", BigInteger),
    Column("finished_ms", BigInteger),
    Column("error", Text),
    UniqueConstraint("campaign", "occurrence"),
    Index(None, "status", "heartbeat_ms"),
)

audience_members = Table(
    "audience_members",
    metadata,
    Column("campaign", String(200), nullable=False),
    Column("customer_id", BigInteger, nullable=False),
    Column("added_ms", BigInteger, nullable=False),
    Column("run_id", Integer),
    PrimaryKeyConstraint("campaign", "customer_id"),
)
