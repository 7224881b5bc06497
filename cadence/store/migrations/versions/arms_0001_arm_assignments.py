"""arms: each customer's first holdout-arm assignment per campaign; the decision mix's two columns

The dashboard's holdout lift and decision mix parsed every explanation of their range: at
500,000 decisions in 30 days, the attribution page took 4-5 s and the campaigns page 0.4-0.5 s.
``arm_assignments`` keeps, per campaign with a holdout arm and customer, the first decision that
drew the customer an arm of it (held out, or a sending arm, sent or not), written with the
decision; ``decisions.explored`` and ``decisions.suppressed`` keep what the decision mix counts.

The assignments of the decisions already stored are filled here from their explanations, so the
lift of a range before this revision reads the same: two passes over them in time order (the
campaigns that held anyone out, then each customer's first arm, written a chunk at a time, so
memory holds one chunk whatever the number of customers). On the dashboard benchmark's 500,000
decisions, SQLite: 9.9 s at load 2 (7.4 s holding every customer's arm in memory; 32.7 s reading
the decisions customer by customer instead), and the same 196,500 assignments its commits would
have written. The two columns stay NULL for those decisions: the decision mix reads their
explanations, as before.

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
    """Every decision's customer, time, campaign and explanation text, in time order, streamed."""
    # Per statement: a connection's own execution options would stream alembic's statements too.
    result = bind.exec_driver_sql(
        "SELECT customer_id, decided_at_ms, campaign, CAST(explanation AS TEXT) FROM decisions "
        "ORDER BY decided_at_ms",
        execution_options={"stream_results": True, "yield_per": _CHUNK},
    )
    for row in result:
        yield row[0], row[1], row[2], row[3]


def _arms(bind: sa.Connection) -> Iterator[tuple[str, int, int, bool]]:
    """Every arm the stored decisions drew of a campaign that held anyone out, in time order:
    (campaign, customer, decided ms, held). One pass finds those campaigns, a second reads the arms."""
    held_out: set[str] = set()
    for _customer, _ms, _campaign, text in _explanations(bind):
        if '"holdout":["' in text or '"holdout": ["' in text:
            held_out.update(orjson.loads(text).get("holdout") or ())
    if not held_out:
        return
    for customer, ms, campaign, text in _explanations(bind):
        info: dict[str, Any] = orjson.loads(text)
        held = set(info.get("holdout") or ()) & held_out
        for c in held:
            yield c, customer, ms, True
        if "conditions" in info:
            early = {
                s.get("campaign") for s in info.get("suppressions", ()) if s.get("reason") in _BEFORE_SPLIT
            }
            for c in info["conditions"]:
                if c in held_out and c not in held and c not in early:
                    yield c, customer, ms, False
        elif campaign in held_out:  # a scheduled push's send: no explanation kept, a sending arm
            yield campaign, customer, ms, False


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
    # In time order, a customer's first arm is the first written: the table itself remembers who
    # has one (DO NOTHING), so memory holds one chunk whatever the number of customers.
    insert = sa.text(
        "INSERT INTO arm_assignments (campaign, customer_id, first_ms, held) "
        "VALUES (:campaign, :customer_id, :first_ms, :held) ON CONFLICT (campaign, customer_id) DO NOTHING"
    )
    chunk: dict[tuple[str, int], tuple[int, bool]] = {}
    for campaign, customer, ms, held in _arms(bind):
        chunk.setdefault((campaign, customer), (ms, held))
        if len(chunk) == _CHUNK:
            bind.execute(insert, _params(chunk))
            chunk = {}
    if chunk:
        bind.execute(insert, _params(chunk))


def _params(chunk: dict[tuple[str, int], tuple[int, bool]]) -> list[dict[str, Any]]:
    return [
        {"campaign": c, "customer_id": customer, "first_ms": ms, "held": held}
        for (c, customer), (ms, held) in chunk.items()
    ]


def downgrade() -> None:
    op.execute("ALTER TABLE decisions DROP COLUMN suppressed")
    op.execute("ALTER TABLE decisions DROP COLUMN explored")
    op.drop_index(op.f("ix_arm_assignments_customer_id"), table_name="arm_assignments")
    op.drop_index(op.f("ix_arm_assignments_campaign_held_first_ms"), table_name="arm_assignments")
    op.drop_table("arm_assignments")
