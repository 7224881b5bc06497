"""stitch: each merged customer remembers the event that merged it; sends are indexed by the time queued

The learners keep a customer's statistics in memory and fold a merged-away customer into the
customer it joined. A live learner folded a merge when the engine loop applied it; one restarted
from a snapshot folded every merge at once, before replaying the feedback that came between the
snapshot and the merge, so that feedback taught the joined customer's own effect instead of the
merged-away one's (a merged customer's email effect 0.608 before a restart, 0.660 after). With
the event's id, the learners fold each merge where the log made it, live and in a replay alike.
NULL for customers merged before this revision (folded at start, as before).

Revision ID: stitch_0001
Revises: replay_0001
Create Date: 2026-11-28 00:22:07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "stitch_0001"
down_revision = "replay_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The learners of each ``serve --workers N`` process read the sends the others queued lately,
    # to learn their decisions too (a worker learned only its own sends' silences, and every
    # answered one: its learners leaned towards yes, 0.70 against 0.32 in an outside check).
    op.create_index("ix_sends_queued_ms", "sends", ["queued_ms"], unique=False)
    # A plain ADD COLUMN and a partial index of the merged rows only: no table copy.
    op.add_column("customers", sa.Column("merged_at_event", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_customers_merged_at_event",
        "customers",
        ["merged_at_event"],
        unique=False,
        sqlite_where=sa.text("merged_at_event IS NOT NULL"),
        postgresql_where=sa.text("merged_at_event IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_sends_queued_ms", table_name="sends")
    op.drop_index("ix_customers_merged_at_event", table_name="customers")
    # Not a batch (a copy of the table) on SQLite: dropping the old ``customers`` would cascade to
    # every table whose rows reference a customer. SQLite drops a plain column in place (3.35+).
    op.execute("ALTER TABLE customers DROP COLUMN merged_at_event")
