"""position: each sent decision remembers how far its process's learners had read the event log

A decision's learners register it when it is committed, after the events they have read by
then. A restart replaying the log registered it by its ``at`` instead: a decision made as of
hours before events already logged (a simulation whose customers keep clocks of their own) was
registered before those events, so its labels reached the models in another order and every
option's value moved (an outside check: 286 of 287 options, with 6% of decisions going back in
time). With the position, a replay registers each decision where the live learners did. NULL for
decisions made before this revision (registered by their time, as before) and for those that send
nothing.

Revision ID: position_0001
Revises: trigger_0001
Create Date: 2026-11-28 02:23:12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "position_0001"
down_revision = "trigger_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN and a partial index of the rows that have one: no table copy.
    op.add_column("decisions", sa.Column("learner_position", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_decisions_learner_position",
        "decisions",
        ["learner_position"],
        unique=False,
        sqlite_where=sa.text("learner_position IS NOT NULL"),
        postgresql_where=sa.text("learner_position IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_decisions_learner_position", table_name="decisions")
    # In place on SQLite (3.35+): a batch copy of ``decisions`` is not needed for one column.
    op.execute("ALTER TABLE decisions DROP COLUMN learner_position")
