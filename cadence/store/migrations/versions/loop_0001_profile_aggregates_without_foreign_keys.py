"""profile aggregates without a foreign key to customers; byte-wise keys on PostgreSQL

The engine loop writes about three profile rows per event; on PostgreSQL each new row's
key check (a locking look-up in ``customers``) cost more than the write. Erasure deletes
these rows itself, under the loop's batch lock. Identity values and event names, in the
primary keys the loop inserts into, compare byte by byte (``COLLATE "C"``) on PostgreSQL:
the database locale's comparisons cost up to 40% of an identity insert.

Revision ID: loop_0001
Revises: attribution_0004
Create Date: 2026-11-26 02:00:00
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import String

revision = "loop_0001"
down_revision = "attribution_0004"
branch_labels = None
depends_on = None

TABLES = ("profile_daily", "profile_event_stats", "profiles")
#: (table, column, length) compared byte by byte on PostgreSQL.
KEYS = (
    ("identities", "kind", 16),
    ("identities", "value", 200),
    ("profile_event_stats", "event", 200),
    ("profile_daily", "event", 200),
)


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"fk_{table}_customer_id_customers", type_="foreignkey")
    if op.get_bind().dialect.name == "postgresql":
        for table, column, length in KEYS:
            op.alter_column(table, column, type_=String(length, collation="C"), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, column, length in KEYS:
            op.alter_column(table, column, type_=String(length, collation="default"), existing_nullable=False)
    for table in TABLES:
        # Rows of customers erased or never created would fail the restored key: drop them first.
        op.execute(f"DELETE FROM {table} WHERE customer_id NOT IN (SELECT id FROM customers)")
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(
                f"fk_{table}_customer_id_customers", "customers", ["customer_id"], ["id"], ondelete="CASCADE"
            )
