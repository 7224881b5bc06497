"""merge_0001 moves the sends stored under customers merged before it to the customer each became."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Engine, insert, select, text

from cadence.store.db import _alembic_config, migrate
from cadence.store.schema.core import customers
from cadence.store.schema.sends import sends


def test_sends_of_customers_merged_before_the_migration_move_to_the_end_of_the_chain(
    db_engine: Engine,
) -> None:
    config = _alembic_config(db_engine)
    command.downgrade(config, "erasure_0001")
    with db_engine.begin() as conn:
        # 1 merged into 2, merged into 3 (a chain); 4 into 3; 5 stands alone.
        for cid in (3, 5, 2, 1, 4):
            into = {1: 2, 2: 3, 4: 3}.get(cid)
            conn.execute(insert(customers).values(id=cid, created_ms=1, merged_into=into))
        # The columns sends had at erasure_0001 (no queued_ms yet).
        conn.execute(
            text(
                "INSERT INTO sends (idempotency_key, campaign, customer_id, channel, variables, due_ms, status,"
                " attempts, created_ms, updated_ms) VALUES (:key, 'daily', :cid, 'email', '{}', :n, 'queued', 0, 5, 5)"
            ),
            [{"key": f"daily:{cid}:{n}", "cid": cid, "n": n} for cid in (1, 2, 3, 4, 5) for n in (10, 20)],
        )
    migrate(db_engine)
    with db_engine.connect() as conn:
        owners = dict(conn.execute(select(sends.c.idempotency_key, sends.c.customer_id)).all())
        statuses = set(conn.scalars(select(sends.c.status)))
    assert owners == {
        f"daily:{cid}:{n}": {1: 3, 2: 3, 4: 3}.get(cid, cid) for cid in (1, 2, 3, 4, 5) for n in (10, 20)
    }
    assert statuses == {"queued"}  # only the owner changes
