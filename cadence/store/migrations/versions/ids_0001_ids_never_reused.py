"""Event and customer ids are never given twice, on SQLite too (erasure deletes the newest rows)

SQLite gives a new row the table's highest id + 1. An erasure that deleted the log's newest
events let the next events take ids the engine loop had already passed: they were never
applied (their customers never existed). And a new customer took the id of an erased one,
which decisions, learner state and caches had known as someone else.

* ``events`` on SQLite is rebuilt with ``AUTOINCREMENT`` (ids from ``sqlite_sequence``, never
  lower than any given before), the counter started at the highest id given so far: the
  largest stored id or any position the loop or a learner snapshot reached (a database where
  an erasure already freed the newest ids). PostgreSQL draws ids from a sequence already.
  The copy took 7.0 s for 1,000,000 events (a 319 MB database; session 20, this machine).
* ``erasures.customer_ids_to``: the highest customer id when the erasure ran; SQLite's
  customer ids start after it (:func:`cadence.engine.identity._reserve_customer_ids`). An id
  an erasure freed before this migration cannot be known any more: only later ones count.

Revision ID: ids_0001
Revises: notify13_0004
Create Date: 2026-11-27 17:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "ids_0001"
down_revision = "notify13_0004"
branch_labels = None
depends_on = None

COLUMNS = "id, message_id, type, event, user_id, anonymous_id, ts_ms, received_ms, source, payload"


def _events_table(autoincrement: bool) -> str:
    """The table as migrations before this one left it; AUTOINCREMENT needs the key in the column's clause."""
    first, constraint = (
        ("id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT", "")
        if autoincrement
        else ("id INTEGER NOT NULL", ", CONSTRAINT pk_events PRIMARY KEY (id)")
    )
    return (
        f"CREATE TABLE events_rebuilt ({first}, message_id VARCHAR(100) NOT NULL, type VARCHAR(16) NOT NULL,"
        " event VARCHAR(200), user_id VARCHAR(200), anonymous_id VARCHAR(200), ts_ms BIGINT NOT NULL,"
        " received_ms BIGINT NOT NULL, source VARCHAR(64) NOT NULL, payload JSON NOT NULL"
        f"{constraint}, CONSTRAINT uq_events_message_id UNIQUE (message_id))"
    )


def _rebuild_events(autoincrement: bool) -> None:
    """Copy ``events`` into a table declared with or without AUTOINCREMENT, then its indexes (SQLite)."""
    bind = op.get_bind()
    indexes = [
        row[0]
        for row in bind.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events' AND sql IS NOT NULL"
        )
    ]
    op.execute(_events_table(autoincrement))
    op.execute(f"INSERT INTO events_rebuilt ({COLUMNS}) SELECT {COLUMNS} FROM events ORDER BY id")
    op.execute("DROP TABLE events")
    op.execute("ALTER TABLE events_rebuilt RENAME TO events")
    for sql in indexes:  # the partial indexes as they were, WHERE clauses included
        op.execute(sql)


def upgrade() -> None:
    op.add_column("erasures", sa.Column("customer_ids_to", sa.BigInteger(), nullable=True))
    if op.get_bind().dialect.name != "sqlite":
        return
    _rebuild_events(autoincrement=True)
    # The counter starts at the highest id ever given, which a past erasure may have deleted.
    op.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'events', 0"
        " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'events')"
    )
    op.execute(
        "UPDATE sqlite_sequence SET seq = max(seq,"
        " (SELECT coalesce(max(id), 0) FROM events),"
        " (SELECT coalesce(max(position), 0) FROM checkpoints),"
        " (SELECT coalesce(max(position), 0) FROM learner_snapshots)) WHERE name = 'events'"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_events(autoincrement=False)
    with op.batch_alter_table("erasures") as batch:
        batch.drop_column("customer_ids_to")
