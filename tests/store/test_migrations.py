"""The Alembic chain builds exactly the schema the code declares, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select

from cadence.store.db import pending_migrations
from cadence.store.schema import metadata


def test_migrations_match_metadata(db_engine: Engine) -> None:
    with db_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    assert pending_migrations(db_engine) == []


def test_every_table_exists(db_engine: Engine) -> None:
    assert set(metadata.tables) <= set(inspect(db_engine).get_table_names())


def test_event_payloads_survive_the_json_migration_both_ways(db_engine: Engine) -> None:
    """ingest_0003 (payload ``jsonb`` -> ``json`` on PostgreSQL) keeps every stored payload, and so does
    its downgrade; appends work on either side."""
    from alembic import command

    from cadence.engine.events import parse_call
    from cadence.engine.ingest import record_events
    from cadence.store.db import _alembic_config, migrate
    from cadence.store.schema.core import events

    def call(n: int) -> dict[str, object]:
        return {
            "type": "track",
            "event": "Order Completed",
            "userId": f"u{n}",
            "messageId": f"m{n}",
            "properties": {"revenue": 12.5 * n, "items": [{"sku": "a"}, None, True], "note": "é\n"},
        }

    def stored() -> list[tuple[str, object]]:
        with db_engine.connect() as conn:
            return [
                tuple(r)
                for r in conn.execute(select(events.c.message_id, events.c.payload).order_by(events.c.id))
            ]

    command.downgrade(_alembic_config(db_engine), "loop_0002")
    record_events(engine=db_engine, batch=[parse_call(call(1), received_ms=1)])
    before = stored()
    migrate(db_engine)
    assert stored() == before
    record_events(engine=db_engine, batch=[parse_call(call(2), received_ms=1)])
    after = stored()
    assert [m for m, _ in after] == ["m1", "m2"] and after[1][1] == parse_call(call(2), received_ms=1).payload
    command.downgrade(_alembic_config(db_engine), "loop_0002")
    assert stored() == after
    migrate(db_engine)
    assert pending_migrations(db_engine) == []


def test_ids_0001_starts_event_ids_after_any_id_given_and_keeps_the_partial_indexes(
    db_engine: Engine,
) -> None:
    """On a database where an erasure already freed the newest event ids (the loop's position is past
    the log's end), the next event after ids_0001 gets an id above that position; down and up again
    keep every event."""
    from alembic import command
    from sqlalchemy import text

    from cadence.engine.events import parse_call
    from cadence.engine.ingest import record_events
    from cadence.store.db import _alembic_config, migrate
    from cadence.store.schema.core import checkpoints, events

    def append(*names: str) -> None:
        calls = [{"type": "track", "event": "E", "userId": n, "messageId": n} for n in names]
        record_events(engine=db_engine, batch=[parse_call(c, received_ms=1) for c in calls])

    def ids() -> list[tuple[int, str]]:
        with db_engine.connect() as conn:
            return [
                tuple(r) for r in conn.execute(select(events.c.id, events.c.message_id).order_by(events.c.id))
            ]

    command.downgrade(_alembic_config(db_engine), "notify13_0004")
    append("m1", "m2", "m3")
    with db_engine.begin() as conn:
        conn.execute(checkpoints.insert().values(name="identity", position=3, updated_ms=0))
        conn.execute(events.delete().where(events.c.id > 1))  # what an erasure of the newest did
    migrate(db_engine)
    append("m4")
    assert ids() == [(1, "m1"), (4, "m4")]
    command.downgrade(_alembic_config(db_engine), "notify13_0004")
    assert ids() == [(1, "m1"), (4, "m4")]
    migrate(db_engine)
    append("m5")
    assert ids()[-1] == (5, "m5")
    if db_engine.dialect.name == "sqlite":
        with db_engine.connect() as conn:
            index_sql = conn.execute(
                text("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'ix_events_user_id'")
            ).scalar_one()
            table_sql = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'events'")).scalar_one()
        assert "WHERE user_id IS NOT NULL" in index_sql and "AUTOINCREMENT" in table_sql


def test_pending_migrations_are_those_after_the_database_revision(db_engine: Engine) -> None:
    """A database one migration behind names that one (it used to name every revision but its own)."""
    from alembic import command
    from alembic.script import ScriptDirectory

    from cadence.store.db import _alembic_config, migrate

    config = _alembic_config(db_engine)
    newest = next(ScriptDirectory.from_config(config).walk_revisions())  # a head
    command.downgrade(config, str(newest.down_revision))
    assert pending_migrations(db_engine) == [newest.revision]
    migrate(db_engine)
    assert pending_migrations(db_engine) == []
