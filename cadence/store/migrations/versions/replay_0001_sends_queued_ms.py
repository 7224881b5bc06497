"""replay: the wall-clock time each send was queued

``created_ms`` holds the deciding clock (a decision's ``at``). A decision with ``at`` in the
past (a simulation, a replay) queues a send that is due at once, and the dispatcher judged its
quiet hours, caps and spacing by the wall clock: at a real night in the customer's zone it
deferred the send to the next real morning, out of the simulated days (or dropped it), and the
decisions after it no longer counted it. With the time it was queued, a send decided well
before (:data:`cadence.engine.sendqueue.REPLAY_MS`) is told apart and not judged again. NULL
for the rows queued before this revision (judged as before).

Revision ID: replay_0001
Revises: merge_0001
Create Date: 2026-11-27 22:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "replay_0001"
down_revision = "merge_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN on both databases: no table copy, whatever the queue's size.
    op.add_column("sends", sa.Column("queued_ms", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sends", schema=None) as batch_op:
        batch_op.drop_column("queued_ms")
