"""arms_0001 fills each customer's first holdout-arm assignment from the decisions already stored."""

from __future__ import annotations

import orjson
from alembic import command
from sqlalchemy import Engine, insert, select, text

from cadence.store.db import _alembic_config, migrate
from cadence.store.schema.core import customers
from cadence.store.schema.decisions import arm_assignments


def _explanation(*, held: list[str], considered: list[str], early: dict[str, str]) -> str:
    return orjson.dumps(
        {
            "summary": "-",
            "conditions": {c: [] for c in considered},
            "candidates": [],
            "suppressions": [
                {"campaign": c, "reason": r, "detail": "-", "channel": None} for c, r in early.items()
            ]
            + [{"campaign": c, "reason": "holdout", "detail": "-", "channel": None} for c in held],
            "holdout": held,
            "notes": [],
        }
    ).decode()


def test_the_first_arms_of_stored_decisions_are_filled_in(db_engine: Engine) -> None:
    command.downgrade(_alembic_config(db_engine), "scrub_0001")
    decided = [
        # (id, customer, ms, campaign sent, explanation)
        ("a", 1, 500, None, _explanation(held=["promo"], considered=["promo", "daily"], early={})),
        ("b", 1, 100, None, _explanation(held=["promo"], considered=["promo"], early={})),  # earlier: first
        ("c", 2, 200, "daily", _explanation(held=[], considered=["promo", "daily"], early={})),  # sending arm
        (
            "d",
            3,
            300,
            "daily",
            _explanation(held=[], considered=["promo", "daily"], early={"promo": "audience"}),
        ),
        ("e", 4, 400, "promo", orjson.dumps({"push": {"occurrence": "x", "run_id": 1}}).decode()),  # a push
        ("f", 5, 450, "daily", orjson.dumps({"push": {"occurrence": "x", "run_id": 1}}).decode()),
    ]
    with db_engine.begin() as conn:
        for cid in range(1, 6):
            conn.execute(insert(customers).values(id=cid, created_ms=1))
        conn.execute(
            text(
                "INSERT INTO decisions (id, customer_id, decided_at_ms, action, campaign, channel, ruleset_hash,"
                " explanation, inputs, outcome) VALUES (:id, :cid, :ms, 'send', :campaign, 'email', 'h', :x, '{}', '{}')"
            ),
            [
                {"id": i, "cid": c, "ms": ms, "campaign": campaign, "x": x}
                for i, c, ms, campaign, x in decided
            ],
        )
    migrate(db_engine)
    with db_engine.connect() as conn:
        got = {
            (r.campaign, r.customer_id): (r.first_ms, bool(r.held))
            for r in conn.execute(select(arm_assignments))
        }
        mix = set(conn.execute(text("SELECT explored, suppressed FROM decisions")).all())
    # Only promo held anyone out: daily has no holdout arm to measure. Customer 3 was outside
    # promo's audience (no arm); customer 4's pushed send drew a sending arm of it.
    assert got == {("promo", 1): (100, True), ("promo", 2): (200, False), ("promo", 4): (400, False)}
    assert mix == {(None, None)}  # the decision mix reads those decisions' explanations
