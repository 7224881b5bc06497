"""one head for every part

Revision ID: 0003
Revises: attribution_0002, connectors_0001, dashboard_0002, scheduler_0001
Create Date: 2026-11-25 21:14:02.646579
"""

from __future__ import annotations

revision = "0003"
down_revision = ("attribution_0002", "connectors_0001", "dashboard_0002", "scheduler_0001")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
