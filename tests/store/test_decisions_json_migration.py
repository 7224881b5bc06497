"""decisions_0003 (the decision documents ``jsonb`` -> ``json`` on PostgreSQL) keeps every stored row both ways."""

from __future__ import annotations

from typing import Any

from alembic import command
from sqlalchemy import Engine, insert, select

from cadence.store.db import _alembic_config, migrate, pending_migrations
from cadence.store.schema.core import customers
from cadence.store.schema.decisions import decisions


def row(n: int, customer_id: int) -> dict[str, Any]:
    return {
        "id": f"d{n}",
        "customer_id": customer_id,
        "decided_at_ms": 1000 * n,
        "action": "send",
        "campaign": "daily",
        "channel": "email",
        "send_at_ms": 2000 * n,
        "template": "t",
        "arm": None,
        "ruleset_hash": "h",
        "explanation": {
            "summary": "é\n",
            "candidates": [{"score": 0.125, "send_at": None}] * 50,
            "notes": [],
        },
        "inputs": {"traits": {"plan": "pro"}, "zone": "Europe/Berlin", "features": {"idx": [0, 5]}},
        "outcome": {"clicked": 1234} if n % 2 else {},
    }


def column_types(engine: Engine) -> set[str]:
    if engine.dialect.name != "postgresql":
        return set()
    with engine.connect() as conn:
        return {
            str(t)
            for (t,) in conn.exec_driver_sql(
                "SELECT data_type FROM information_schema.columns WHERE table_name = 'decisions'"
                " AND column_name IN ('explanation', 'inputs', 'outcome')"
            )
        }


def compression(engine: Engine) -> tuple[bool, set[str]]:
    """Whether the server has lz4, and the columns' compression methods ('l': lz4, '': the default)."""
    with engine.connect() as conn:
        enumvals = conn.exec_driver_sql(
            "SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'"
        ).scalar()
        found = {
            str(c)
            for (c,) in conn.exec_driver_sql(
                "SELECT attcompression FROM pg_attribute WHERE attrelid = 'decisions'::regclass"
                " AND attname IN ('explanation', 'inputs', 'outcome')"
            )
        }
    return "lz4" in (enumvals or []), found


#: The decisions table's columns at ``ingest_0003`` (``learner_position`` came with position_0001,
#: ``explored`` and ``suppressed`` with arms_0001).
COLUMNS_THEN = [c for c in decisions.c if c.name not in {"learner_position", "explored", "suppressed"}]


def test_decision_documents_survive_the_json_migration_both_ways(db_engine: Engine) -> None:
    def stored() -> list[tuple[Any, ...]]:
        with db_engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(*COLUMNS_THEN).order_by(decisions.c.id))]

    def add(n: int) -> None:
        with db_engine.begin() as conn:
            customer = conn.execute(insert(customers).values(created_ms=1).returning(customers.c.id)).scalar()
            conn.execute(insert(decisions).values(**row(n, int(customer or 0))))

    postgres = db_engine.dialect.name == "postgresql"
    command.downgrade(_alembic_config(db_engine), "ingest_0003")
    assert column_types(db_engine) == ({"jsonb"} if postgres else set())
    add(1)
    add(2)
    before = stored()
    migrate(db_engine)
    assert column_types(db_engine) == ({"json"} if postgres else set())
    if postgres:
        lz4, methods = compression(db_engine)
        assert methods == ({"l"} if lz4 else {""})
    assert stored() == before and before[0][10] == row(1, 0)["explanation"]
    add(3)
    after = stored()
    assert [r[0] for r in after] == ["d1", "d2", "d3"] and after[2][12] == row(3, 0)["outcome"]
    command.downgrade(_alembic_config(db_engine), "ingest_0003")
    assert stored() == after
    if postgres:
        assert compression(db_engine)[1] == {""}
    migrate(db_engine)
    assert pending_migrations(db_engine) == []
