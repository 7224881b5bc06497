"""The Alembic chain builds exactly the schema the code declares, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from cadence.store.db import pending_migrations
from cadence.store.schema import metadata


def test_migrations_match_metadata(db_engine: Engine) -> None:
    with db_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    assert pending_migrations(db_engine) == []


def test_every_table_exists(db_engine: Engine) -> None:
    assert set(metadata.tables) <= set(inspect(db_engine).get_table_names())
