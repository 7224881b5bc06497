"""The send queue: one row per message cadence decided to send, with its fate.

A row is written when a decision is committed (or an audience push enqueues it) with
the time it is due. The dispatcher takes due rows, hands them to the connector, and
records the outcome. ``idempotency_key`` (campaign, customer, occurrence) is unique,
so enqueuing the same send twice is a no-op and a restart never sends twice.

Statuses: ``queued`` -> ``sending`` -> ``sent`` | ``failed`` (dead letter, with the
provider's error) | ``suppressed`` (opted out, capped, or inside ``then drop`` quiet hours at
dispatch time) | ``expired`` (campaign ended before it was due, or before quiet hours let it
go). A queued send whose own feedback (delivered, clicked, unsubscribed...) arrives first is
settled ``sent`` without being sent (:func:`cadence.engine.sendqueue.settle_reached`). A send the dispatcher defers (quiet hours, spacing) stays ``queued`` with a later
``due_ms``; ``last_error`` says why (see :mod:`cadence.connectors.dispatch_rules`).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from cadence.store.schema.base import Id, Json, metadata

__all__ = ["REMOVAL_STATUSES", "SEND_STATUSES", "audience_removals", "sends"]

SEND_STATUSES = ("queued", "sending", "sent", "failed", "suppressed", "expired")
#: The rows that did not (yet) go out, as SQL (the partial index's predicate).
UNSENT_WHERE = "status IN ('queued', 'failed', 'suppressed', 'expired')"

sends = Table(
    "sends",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(200), nullable=False),
    Column("decision_id", String(64)),
    Column("campaign", String(200), nullable=False),
    Column("customer_id", Id, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
    Column("channel", String(32), nullable=False),
    Column("connector", String(64)),
    Column("template", String(200)),
    Column("variables", Json, nullable=False),
    Column("due_ms", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_ms", BigInteger),
    Column("provider_message_id", String(200)),
    Column("last_error", Text),
    Column("created_ms", BigInteger, nullable=False),  # by the deciding clock: a decision's ``at``
    Column("updated_ms", BigInteger, nullable=False),
    # By the wall clock (NULL for rows queued before replay_0001): a send decided as of a time well
    # before it (``at`` in the past: a simulation or replay) is not judged again by the
    # dispatcher's clock (:data:`cadence.engine.sendqueue.REPLAY_MS`).
    Column("queued_ms", BigInteger),
    UniqueConstraint("idempotency_key"),
    Index(None, "status", "due_ms"),
    Index(None, "customer_id", "created_ms"),
    Index(None, "decision_id"),
    # The learners of every process read the sends queued lately by the others (their decisions),
    # by the time they were queued (cadence.engine.learning.LearnerSubscriber): migration stitch_0001.
    Index("ix_sends_queued_ms", "queued_ms"),
    # Rows that did not go out, by campaign and channel: the dashboard counts them from
    # this small partial index alone (sent rows, the bulk of the queue, are not in it).
    Index(
        "ix_sends_unsent",
        "status",
        "campaign",
        "channel",
        sqlite_where=text(UNSENT_WHERE),
        postgresql_where=text(UNSENT_WHERE),
    ),
)

#: ``queued`` (due at ``next_attempt_ms``, or now) -> ``sending`` -> deleted once the platform
#: accepted it, or ``failed`` (the dead letter, with the platform's error).
REMOVAL_STATUSES = ("queued", "sending", "failed")

#: An erased customer's pending removal from an ad audience. The customer's rows (and their
#: sends, by the cascade) are gone: a row holds only what the platform needs, the hashed
#: identifiers in the connector's own names (``Connector.audience_identifiers``), the
#: connector and channel, the audience (``variables``: ``operation: remove`` and the
#: ``audience_id`` or ``user_list``), and the delivery bookkeeping; no customer id, no address.
#: The dispatcher delivers it like a send and deletes it once the platform accepted it.
audience_removals = Table(
    "audience_removals",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("erasure_id", BigInteger, nullable=False),
    Column("campaign", String(200), nullable=False),
    Column("channel", String(32), nullable=False),
    Column("connector", String(64), nullable=False),
    Column("variables", Json, nullable=False),
    Column("identifiers", Json, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_ms", BigInteger),
    Column("last_error", Text),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Index(None, "status", "next_attempt_ms"),
)
