"""arms: each customer's first holdout-arm assignment per campaign; the decision mix's two columns

The dashboard's holdout lift and decision mix parsed every explanation of their range: at
500,000 decisions in 30 days, the attribution page took 4-5 s and the campaigns page 0.4-0.5 s.
``arm_assignments`` keeps, per campaign with a holdout arm and customer, the first decision that
drew the customer an arm of it (held out, or a sending arm, sent or not), written with the
decision; ``decisions.explored`` and ``decisions.suppressed`` keep what the decision mix counts.

The assignments of the decisions already stored are filled here from their explanations (two
passes over them: the campaigns that held anyone out, then the first arm per customer), so the
lift of a range before this revision reads the same (on the dashboard benchmark's 500,000
decisions, SQLite: 7.4 s, and the same 196,500 assignments its commits would have written). The
two columns stay NULL for those decisions: the decision mix reads their explanations, as before.

Revision ID: arms_0001
Revises: scrub_0001
Create Date: 2026-11-28 04:43:40
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op

revision = "arms_0001"
down_revision = "scrub_0001"
branch_labels = None
depends_on = None

#: A campaign suppressed for one of these reasons was not split: the decision drew no arm of it
#: (as ``cadence.engine.decide`` stood at this revision).
_BEFORE_SPLIT = frozenset({"not_started", "ended", "trigger", "audience", "unless"})
_CHUNK = 10_000


def _explanations(bind: sa.Connection) -> Iterator[tuple[int, int, str | None, str]]:
    """Every decision's customer, time, campaign and explanation text, in time order."""
    # Per statement: a connection's own execution options would stream alembic's statements too.
    result = bind.exec_driver_sql(
        "SELECT customer_id, decided_at_ms, campaign, CAST(explanation AS TEXT) FROM decisions "
        "ORDER BY decided_at_ms",
        execution_options={"stream_results": True, "yield_per": _CHUNK},
    )
    for row in result:
        yield row[0], row[1], row[2], row[3]


def _first_arms(bind: sa.Connection) -> dict[tuple[str, int], tuple[int, bool]]:
    held_out: set[str] = set()
    for _customer, _ms, _campaign, text in _explanations(bind):
        if '"holdout":["' in text or '"holdout": ["' in text:
            held_out.update(orjson.loads(text).get("holdout") or ())
    first: dict[tuple[str, int], tuple[int, bool]] = {}
    if not held_out:
        return first
    for customer, ms, campaign, text in _explanations(bind):
        info: dict[str, Any] = orjson.loads(text)
        held = set(info.get("holdout") or ()) & held_out
        arms: list[tuple[str, bool]] = [(c, True) for c in held]
        if "conditions" in info:
            early = {
                s.get("campaign") for s in info.get("suppressions", ()) if s.get("reason") in _BEFORE_SPLIT
            }
            arms += [
                (c, False) for c in info["conditions"] if c in held_out and c not in held and c not in early
            ]
        elif campaign in held_out:  # a scheduled push's send: no explanation kept, a sending arm
            arms.append((campaign, False))
        for arm in arms:
            first.setdefault((arm[0], customer), (ms, arm[1]))
    return first


def upgrade() -> None:
    op.create_table(
        "arm_assignments",
        sa.Column("campaign", sa.String(length=200), nullable=False),
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("first_ms", sa.BigInteger(), nullable=False),
        sa.Column("held", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name=op.f("fk_arm_assignments_customer_id_customers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("campaign", "customer_id", name=op.f("pk_arm_assignments")),
    )
    op.create_index(
        op.f("ix_arm_assignments_campaign_held_first_ms"),
        "arm_assignments",
        ["campaign", "held", "first_ms"],
        unique=False,
    )
    op.create_index(op.f("ix_arm_assignments_customer_id"), "arm_assignments", ["customer_id"], unique=False)
    # Plain ADD COLUMNs: no table copy.
    op.add_column("decisions", sa.Column("explored", sa.Boolean(), nullable=True))
    op.add_column("decisions", sa.Column("suppressed", sa.Text(), nullable=True))

    bind = op.get_bind()
    first = _first_arms(bind)
    rows = [
        {"campaign": c, "customer_id": customer, "first_ms": ms, "held": held}
        for (c, customer), (ms, held) in first.items()
    ]
    insert = sa.text(
        "INSERT INTO arm_assignments (campaign, customer_id, first_ms, held) "
        "VALUES (:campaign, :customer_id, :first_ms, :held)"
    )
    for start in range(0, len(rows), _CHUNK):
        bind.execute(insert, rows[start : start + _CHUNK])


def downgrade() -> None:
    op.execute("ALTER TABLE decisions DROP COLUMN suppressed")
    op.execute("ALTER TABLE decisions DROP COLUMN explored")
    op.drop_index(op.f("ix_arm_assignments_customer_id"), table_name="arm_assignments")
    op.drop_index(op.f("ix_arm_assignments_campaign_held_first_ms"), table_name="arm_assignments")
    op.drop_table("arm_assignments")
