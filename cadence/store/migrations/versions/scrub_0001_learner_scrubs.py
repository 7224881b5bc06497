"""scrub: the customers an erasure took out of the learners, until every stored snapshot forgot them

A learner snapshot keeps each customer's statistics (their sends' times, clicks and click hours,
their own effects) and pending decisions. An erasure corrected the live learners of the process
that ran it and no stored snapshot: the latest, the pinned one and those kept for rolling back
still held the customer, and a restart loaded them back. Rewriting every snapshot inside the
erasure's transaction would hold the engine loop for seconds a snapshot (5.4 s at 100,000
customers), so the erasure notes the customer here and the leader's scrub job rewrites the
snapshots, then deletes the row. It holds the internal id alone, nothing that names a person.

Revision ID: scrub_0001
Revises: position_0001
Create Date: 2026-11-28 02:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "scrub_0001"
down_revision = "position_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "learner_scrubs",
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        sa.Column("erased_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", name=op.f("pk_learner_scrubs")),
    )


def downgrade() -> None:
    op.drop_table("learner_scrubs")
