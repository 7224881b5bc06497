"""PostgreSQL: notify the customers whose decision inputs a transaction changed (channel ``cadence_inputs``)

A decision checks its cached customer inputs with one statement: the customer's counting
sends (status ``queued``, ``sending`` or ``sent``) and the profile's stamp (``event_count``,
``updated_event_id``, ``customers.merged_into``). On PostgreSQL that is a round trip per
preview. With these triggers every statement that changes what the check reads notifies
the customer ids it changed, once it commits, and a worker that LISTENs may answer a
preview of a customer nothing was notified for without the check
(:mod:`cadence.engine.decision_state`).

Sends and customers: statement-level triggers with transition tables, whatever writes (the
decision commits and pushes, delivery, the operator, the scheduler, identity merges, erasure,
compaction): one ``pg_notify`` per statement with the distinct ids, in chunks of 350 (under
the 8,000-byte payload limit), or ``*`` (everyone) when a statement changed more than 2,000
customers (``cadence_notify_inputs``). A send's update notifies only when it enters or leaves
the counting statuses or changes what the check reads of it.

Profiles: no trigger. Their writers (the engine loop's profile subscriber: batches, merges,
erasure; the scheduler's seed) call ``cadence_notify_inputs`` with the customers they wrote
(``cadence.engine.profiles.notify_inputs``). Triggers on ``profiles`` (insert and update, with
transition tables) were measured first: the engine loop's profile path fell from 21,692
events/s (median of 3; runs 19,443 / 21,692 / 24,266) to 18,985 (18,985 / 18,622 / 19,541),
under its 20,000 goal: the transition tables copy every written profile row whole, traits
included. SQLite has neither: it checks every decision, in process.

Revision ID: notify13_0004
Revises: decisions_0003
Create Date: 2026-11-27 02:30:00
"""

from __future__ import annotations

from alembic import op

revision = "notify13_0004"
down_revision = "decisions_0003"
branch_labels = None
depends_on = None

COUNTING = "('queued', 'sending', 'sent')"

NOTIFY = """
CREATE FUNCTION cadence_notify_inputs(ids bigint[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  n integer := coalesce(array_length(ids, 1), 0);
  i integer := 1;
BEGIN
  IF n = 0 THEN
    RETURN;
  END IF;
  IF n > 2000 THEN
    PERFORM pg_notify('cadence_inputs', '*');
    RETURN;
  END IF;
  WHILE i <= n LOOP
    PERFORM pg_notify('cadence_inputs', array_to_string(ids[i:i + 349], ','));
    i := i + 350;
  END LOOP;
END
$$
"""

#: (trigger name, table, event, transition tables, the changed customer ids as a query)
TRIGGERS = (
    (
        "cadence_inputs_sends_ins",
        "sends",
        "INSERT",
        "NEW TABLE AS cadence_new",
        f"SELECT DISTINCT customer_id FROM cadence_new WHERE status IN {COUNTING}",
    ),
    (
        "cadence_inputs_sends_upd",
        "sends",
        "UPDATE",
        "OLD TABLE AS cadence_old NEW TABLE AS cadence_new",
        "SELECT DISTINCT c FROM cadence_old o JOIN cadence_new n ON n.id = o.id, "
        "LATERAL (VALUES (o.customer_id), (n.customer_id)) AS v(c) "
        f"WHERE (o.status IN {COUNTING}) IS DISTINCT FROM (n.status IN {COUNTING}) "
        f"OR (n.status IN {COUNTING} AND (o.customer_id, o.due_ms, o.campaign, o.channel) "
        "IS DISTINCT FROM (n.customer_id, n.due_ms, n.campaign, n.channel))",
    ),
    (
        "cadence_inputs_sends_del",
        "sends",
        "DELETE",
        "OLD TABLE AS cadence_old",
        f"SELECT DISTINCT customer_id FROM cadence_old WHERE status IN {COUNTING}",
    ),
    (
        "cadence_inputs_customers_upd",
        "customers",
        "UPDATE",
        "OLD TABLE AS cadence_old NEW TABLE AS cadence_new",
        "SELECT DISTINCT c FROM cadence_old o JOIN cadence_new n ON n.id = o.id, "
        "LATERAL (VALUES (o.id), (n.merged_into)) AS v(c) "
        "WHERE o.merged_into IS DISTINCT FROM n.merged_into AND c IS NOT NULL",
    ),
    (
        "cadence_inputs_customers_del",
        "customers",
        "DELETE",
        "OLD TABLE AS cadence_old",
        "SELECT DISTINCT id FROM cadence_old",
    ),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(NOTIFY)
    for name, table, event, referencing, ids in TRIGGERS:
        op.execute(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
            f"BEGIN\n  PERFORM cadence_notify_inputs(ARRAY({ids}));\n  RETURN NULL;\nEND\n$$"
        )
        op.execute(
            f"CREATE TRIGGER {name} AFTER {event} ON {table} REFERENCING {referencing} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {name}()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, table, _, _, _ in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    op.execute("DROP FUNCTION IF EXISTS cadence_notify_inputs(bigint[])")
