"""scheduler jobs, runs and audience members

Revision ID: scheduler_0001
Revises: 0002
Create Date: 2026-11-25 20:25:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "scheduler_0001"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scheduled_jobs",
        sa.Column("campaign", sa.String(length=200), nullable=False),
        sa.Column("schedule", sa.String(length=200), nullable=False),
        sa.Column("cron", sa.String(length=100), nullable=False),
        sa.Column("zone", sa.String(length=64), nullable=False),
        sa.Column("registered_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_fire_ms", sa.BigInteger(), nullable=False),
        sa.Column("next_run_ms", sa.BigInteger(), nullable=True),
        sa.Column("removed_ms", sa.BigInteger(), nullable=True),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("campaign", name=op.f("pk_scheduled_jobs")),
    )
    op.create_table(
        "scheduled_runs",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("campaign", sa.String(length=200), nullable=False),
        sa.Column("occurrence", sa.String(length=64), nullable=False),
        sa.Column("fire_ms", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=True),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.Column("evaluated", sa.BigInteger(), nullable=False),
        sa.Column("enqueued", sa.BigInteger(), nullable=False),
        sa.Column("late_ms", sa.BigInteger(), nullable=False),
        sa.Column("started_ms", sa.BigInteger(), nullable=True),
        sa.Column("heartbeat_ms", sa.BigInteger(), nullable=True),
        sa.Column("finished_ms", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduled_runs")),
        sa.UniqueConstraint("campaign", "occurrence", name=op.f("uq_scheduled_runs_campaign_occurrence")),
    )
    op.create_index(
        op.f("ix_scheduled_runs_status_heartbeat_ms"),
        "scheduled_runs",
        ["status", "heartbeat_ms"],
        unique=False,
    )
    op.create_table(
        "audience_members",
        sa.Column("campaign", sa.String(length=200), nullable=False),
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        sa.Column("added_ms", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("campaign", "customer_id", name=op.f("pk_audience_members")),
    )


def downgrade() -> None:
    op.drop_table("audience_members")
    op.drop_index(op.f("ix_scheduled_runs_status_heartbeat_ms"), table_name="scheduled_runs")
    op.drop_table("scheduled_runs")
    op.drop_table("scheduled_jobs")
