"""events.payload as ``json`` rather than ``jsonb`` on PostgreSQL (the text as given, validated)

Every append stored the payload as ``jsonb``: the server parsed the text and built the
binary form, about a quarter of its work per imported event (measured with ``COPY`` of
100,000 imported rows: 13.9 us an event with ``jsonb``, 10.7 us with ``json``). The
payload is only ever read whole (the engine loop reads it as text, the export decodes
it), never queried inside nor indexed, so ``json`` (the text, checked to be valid JSON)
serves the same. The column is rewritten; SQLite stores JSON as text already.

Revision ID: ingest_0003
Revises: loop_0002
Create Date: 2026-11-26 09:30:00
"""

from __future__ import annotations

from alembic import op

revision = "ingest_0003"
down_revision = "loop_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE events ALTER COLUMN payload TYPE json USING payload::json")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE events ALTER COLUMN payload TYPE jsonb USING payload::jsonb")
