"""decisions.explanation, inputs and outcome as ``json`` rather than ``jsonb`` on PostgreSQL, lz4-compressed

A committed decision stores its explanation (every candidate with its send time and
scores: about 13 KB for one campaign on three channels at 24 send times). As ``jsonb``
the server parsed it, built the binary form and compressed it with pglz: about 0.4-0.5 ms
of its CPU per row, most of what a commit costs PostgreSQL (0.6 ms). As ``json`` (the
text, checked to be valid JSON) compressed with lz4 it costs about 0.1 ms (measured: 2,000
rows of 13.4 KB inserted 20 to a transaction, backend CPU 385-530 us a row as ``jsonb``,
210-280 as ``json`` with pglz, 105-125 as ``json`` with lz4, 90-95 uncompressed; the
stored size is the same within 1%). The three documents are read and written whole,
never queried inside nor indexed. lz4 only where the server was built with it (the
column keeps the default compression otherwise). SQLite stores JSON as text already.

Revision ID: decisions_0003
Revises: ingest_0003
Create Date: 2026-11-26 19:20:00
"""

from __future__ import annotations

from alembic import op

revision = "decisions_0003"
down_revision = "ingest_0003"
branch_labels = None
depends_on = None

COLUMNS = ("explanation", "inputs", "outcome")


def _has_lz4() -> bool:
    found = (
        op.get_bind()
        .exec_driver_sql("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
        .scalar()
    )
    return found is not None and "lz4" in found


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    changes = [f"ALTER COLUMN {c} TYPE json USING {c}::json" for c in COLUMNS]
    if _has_lz4():
        changes += [f"ALTER COLUMN {c} SET COMPRESSION lz4" for c in COLUMNS]
    op.execute("ALTER TABLE decisions " + ", ".join(changes))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    changes = [f"ALTER COLUMN {c} TYPE jsonb USING {c}::jsonb" for c in COLUMNS]
    changes += [f"ALTER COLUMN {c} SET COMPRESSION default" for c in COLUMNS]
    op.execute("ALTER TABLE decisions " + ", ".join(changes))
