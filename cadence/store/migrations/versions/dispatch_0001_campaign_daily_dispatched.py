"""campaign_daily.dispatched: the messages cadence's dispatcher sent, per day, campaign and channel

The campaigns page knew a message had gone out only from a ``Message Sent`` or delivery report.
The dry-run outbox (what a fresh install sends through) and connectors whose provider reports no
delivery made none, so their campaigns read "Sent 0" and no rates beside the queue's sent rows.
The dispatcher now counts each message a connector took, with its outcome. The sends already
sent by the dispatcher (a connector recorded, not settled by a report of a delivery elsewhere)
are counted here, by the UTC day they were recorded.

Revision ID: dispatch_0001
Revises: arms_0001
Create Date: 2026-11-28 09:37:45
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "dispatch_0001"
down_revision = "arms_0001"
branch_labels = None
depends_on = None

#: campaign_daily's count columns at this revision (a migration does not follow the schema module).
_KINDS = (
    "sent",
    "delivered",
    "opened",
    "clicked",
    "bounced",
    "failed",
    "unsubscribed",
    "spam_report",
    "converted",
)


def upgrade() -> None:
    # A plain ADD COLUMN: no table copy.
    op.add_column(
        "campaign_daily",
        sa.Column("dispatched", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    zeros = ", ".join("0" for _ in _KINDS)
    op.execute(
        f"INSERT INTO campaign_daily (day, campaign, channel, {', '.join(_KINDS)}, dispatched) "
        f"SELECT updated_ms / 86400000, SUBSTR(campaign, 1, 200), SUBSTR(channel, 1, 32), {zeros}, COUNT(*) "
        "FROM sends WHERE status = 'sent' AND connector IS NOT NULL "
        "AND (last_error IS NULL OR last_error NOT LIKE 'settled:%') "
        "GROUP BY updated_ms / 86400000, SUBSTR(campaign, 1, 200), SUBSTR(channel, 1, 32) "
        "ON CONFLICT (day, campaign, channel) DO UPDATE SET dispatched = excluded.dispatched"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE campaign_daily DROP COLUMN dispatched")
