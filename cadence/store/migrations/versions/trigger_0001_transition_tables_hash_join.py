"""PostgreSQL: the sends and customers update triggers join their transition tables by hash

The update triggers of ``notify13_0004`` join the statement's old and new rows by id. PL/pgSQL
caches the query's plan from its first executions in a session, which are mostly small (a
decision's send, one merge), and kept the nested loop for every later statement: a
dispatcher round updating 5,000 sends compared 25 million pairs, about a second a statement,
twice a round (the claim and the record). On the scheduled-push benchmark (100,000
customers), the trigger took 56 s of the PostgreSQL server's time in 53 statements, and the
dispatcher's rounds took 3.5-4.5 s each while the push ran. With nested loops priced out
inside these two functions the planner joins by hash whatever it saw first: a 5,990-row update
took 0.20 s against 6.08 s.

Revision ID: trigger_0001
Revises: stitch_0001
Create Date: 2026-11-28 00:40:00
"""

from __future__ import annotations

from alembic import op

revision = "trigger_0001"
down_revision = "stitch_0001"
branch_labels = None
depends_on = None

#: The trigger functions that join ``cadence_old`` to ``cadence_new`` (see notify13_0004).
JOINING = ("cadence_inputs_sends_upd", "cadence_inputs_customers_upd")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in JOINING:
        op.execute(f"ALTER FUNCTION {name}() SET enable_nestloop = off")
        # Pricing nested loops out puts the plan over ``jit_above_cost`` (the LATERAL pair is one
        # anyway): JIT compiled it at every statement, 127 ms against a 3 ms join.
        op.execute(f"ALTER FUNCTION {name}() SET jit = off")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in JOINING:
        op.execute(f"ALTER FUNCTION {name}() RESET enable_nestloop")
        op.execute(f"ALTER FUNCTION {name}() RESET jit")
