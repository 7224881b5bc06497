"""index decisions by decision time (the dashboard's date ranges) and customers by merged_into (look-ups)

Revision ID: dashboard_0002
Revises: dashboard_0001, decisions_0002 (it needs the decisions table)
Create Date: 2026-11-25 20:40:00
"""

from __future__ import annotations

from alembic import op

revision = "dashboard_0002"
down_revision = ("dashboard_0001", "decisions_0002")
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_decisions_decided_at_ms", "decisions", ["decided_at_ms"], unique=False)
    op.create_index("ix_customers_merged_into", "customers", ["merged_into"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_customers_merged_into", table_name="customers")
    op.drop_index("ix_decisions_decided_at_ms", table_name="decisions")
