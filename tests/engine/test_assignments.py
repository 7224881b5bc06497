"""Writing holdout-arm assignments: the earliest stays, nothing for a customer who is gone."""

from __future__ import annotations

from sqlalchemy import Engine, insert, select

from cadence.engine.assignments import ASSIGN_ARMS, write_arms
from cadence.store.fast import execute_many
from cadence.store.schema.core import customers
from cadence.store.schema.decisions import arm_assignments


def stored(engine: Engine) -> dict[tuple[str, int], tuple[int, bool]]:
    with engine.connect() as conn:
        return {
            (r.campaign, r.customer_id): (r.first_ms, bool(r.held))
            for r in conn.execute(select(arm_assignments))
        }


def test_many_arms_at_once_keep_the_earliest_and_skip_customers_who_are_gone(db_engine: Engine) -> None:
    with db_engine.begin() as conn:
        for cid in (1, 2, 3):
            conn.execute(insert(customers).values(id=cid, created_ms=1))
        execute_many(conn, ASSIGN_ARMS, [("promo", 500, True, 1), ("promo", 100, False, 2)])
    with db_engine.begin() as conn:
        write_arms(
            conn,
            [
                ("promo", 700, False, 1),  # later than the stored one: it stays
                ("promo", 50, True, 2),  # earlier: it replaces it, arm and all
                ("promo", 400, False, 3),
                ("promo", 200, True, 3),  # twice in one call: the earliest
                ("promo", 100, False, 99),  # no such customer (erased meanwhile): nothing
                ("daily", 100, False, 1),
            ],
        )
    assert stored(db_engine) == {
        ("promo", 1): (500, True),
        ("promo", 2): (50, True),
        ("promo", 3): (200, True),
        ("daily", 1): (100, False),
    }
