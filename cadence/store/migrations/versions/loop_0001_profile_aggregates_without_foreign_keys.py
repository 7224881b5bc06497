"""profile aggregates without a foreign key to customers (the engine loop's per-row key checks)

The engine loop writes about three profile rows per event; on PostgreSQL each new row's
key check (a locking look-up in ``customers``) cost more than the write. Erasure deletes
these rows itself, under the loop's batch lock.

Revision ID: loop_0001
Revises: 0003
Create Date: 2026-11-26 02:00:00
"""

from __future__ import annotations

from alembic import op

revision = "loop_0001"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLES = ("profile_daily", "profile_event_stats", "profiles")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"fk_{table}_customer_id_customers", type_="foreignkey")


def downgrade() -> None:
    for table in TABLES:
        # Rows of customers erased or never created would fail the restored key: drop them first.
        op.execute(f"DELETE FROM {table} WHERE customer_id NOT IN (SELECT id FROM customers)")
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(
                f"fk_{table}_customer_id_customers", "customers", ["customer_id"], ["id"], ondelete="CASCADE"
            )
