"""dashboard tables: campaign_daily, ui_secrets

Revision ID: dashboard_0001
Revises: 0002
Create Date: 2026-11-25 20:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "dashboard_0001"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "campaign_daily",
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("campaign", sa.String(length=200), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("sent", sa.BigInteger(), nullable=False),
        sa.Column("delivered", sa.BigInteger(), nullable=False),
        sa.Column("opened", sa.BigInteger(), nullable=False),
        sa.Column("clicked", sa.BigInteger(), nullable=False),
        sa.Column("bounced", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("unsubscribed", sa.BigInteger(), nullable=False),
        sa.Column("spam_report", sa.BigInteger(), nullable=False),
        sa.Column("converted", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "campaign", "channel", name=op.f("pk_campaign_daily")),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "ui_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_ui_secrets")),
    )


def downgrade() -> None:
    op.drop_table("ui_secrets")
    op.drop_table("campaign_daily")
