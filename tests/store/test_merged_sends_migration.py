"""merge_0001 moves the sends stored under customers merged before it to the customer each became."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Engine, insert, select

from cadence.engine.sendqueue import enqueue_sends
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
        enqueue_sends(
            conn,
            [
                {
                    "key": f"daily:{cid}:{n}",
                    "campaign": "daily",
                    "customer_id": cid,
                    "channel": "email",
                    "due_ms": n,
                }
                for cid in (1, 2, 3, 4, 5)
                for n in (10, 20)
            ],
            now_ms=5,
        )
    migrate(db_engine)
    with db_engine.connect() as conn:
        owners = dict(conn.execute(select(sends.c.idempotency_key, sends.c.customer_id)).all())
        statuses = set(conn.scalars(select(sends.c.status)))
    assert owners == {
        f"daily:{cid}:{n}": {1: 3, 2: 3, 4: 3}.get(cid, cid) for cid in (1, 2, 3, 4, 5) for n in (10, 20)
    }
    assert statuses == {"queued"}  # only the owner changes
