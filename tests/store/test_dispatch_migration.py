"""dispatch_0001 counts the sends the dispatcher already sent, so the campaigns page reads them as sent."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Engine, insert, text

from cadence.engine.campaign_stats import campaign_stats
from cadence.store.db import _alembic_config, migrate
from cadence.store.schema.core import customers

DAY = 86_400_000


def test_sends_already_sent_by_the_dispatcher_are_counted(db_engine: Engine) -> None:
    command.downgrade(_alembic_config(db_engine), "arms_0001")
    rows = [
        # (campaign, channel, status, connector, last_error, updated ms)
        ("spring", "email", "sent", "outbox", None, 20_000 * DAY + 5),
        ("spring", "email", "sent", "sendgrid", None, 20_000 * DAY + 9),
        ("spring", "email", "sent", "sendgrid", None, 20_001 * DAY),  # the next day
        (
            "spring",
            "email",
            "sent",
            None,
            "settled: Email Delivered arrived before cadence sent it",
            20_000 * DAY,
        ),
        ("spring", "email", "failed", "sendgrid", "bounced", 20_000 * DAY),
        ("spring", "push", "queued", None, None, 20_000 * DAY),
    ]
    with db_engine.begin() as conn:
        conn.execute(insert(customers).values(id=1, created_ms=1))
        conn.execute(
            text(
                "INSERT INTO sends (idempotency_key, campaign, customer_id, channel, connector, variables,"
                " due_ms, status, attempts, last_error, created_ms, updated_ms)"
                " VALUES (:k, :c, 1, :ch, :conn, '{}', 0, :st, 1, :err, 0, :ms)"
            ),
            [
                {"k": f"k{i}", "c": c, "ch": ch, "st": st, "conn": conn_, "err": err, "ms": ms}
                for i, (c, ch, st, conn_, err, ms) in enumerate(rows)
            ],
        )
        # The day already has feedback counts: one delivery reported.
        conn.execute(
            text(
                "INSERT INTO campaign_daily (day, campaign, channel, sent, delivered, opened, clicked, bounced,"
                " failed, unsubscribed, spam_report, converted) VALUES (20000, 'spring', 'email', 0, 1, 0, 1, 0,"
                " 0, 0, 0, 0)"
            )
        )
    migrate(db_engine)
    with db_engine.connect() as conn:
        stats = campaign_stats(conn, since_day=20_000, until_day=20_001)
        dispatched = dict(
            conn.execute(text("SELECT day, dispatched FROM campaign_daily WHERE channel = 'email'")).all()
        )
    assert dispatched == {20_000: 2, 20_001: 1}  # not the settled one, nor the failed one
    assert stats.totals[("spring", "email")]["sent"] == 3
    assert stats.totals[("spring", "email")]["clicked"] == 1  # the counts already there are kept
    assert ("spring", "push") not in stats.totals
