"""Decisions and learner snapshots.

Learner snapshots: the learners' state, versioned with the event-log position it reflects.

A snapshot is written by the leader's learner subscriber every so often; a restart
loads the latest one and the engine loop replays the log after ``position``.
``cadence models`` lists them with their recent quality; an operator can pin one
(decisions are then scored by that frozen version) or roll back to an older one.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from cadence.store.schema.base import Id, Json, JsonText, metadata

__all__ = ["arm_assignments", "decisions", "learner_snapshots"]

learner_snapshots = Table(
    "learner_snapshots",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),  # which learner ("decisions")
    Column("version", Integer, nullable=False),  # 1, 2, ... per name
    Column("position", BigInteger, nullable=False),  # last event id reflected
    Column("created_ms", BigInteger, nullable=False),
    Column("labels", BigInteger, nullable=False),  # labels learned so far
    Column("quality", Json, nullable=False),  # rolling AUC / log loss at snapshot time
    Column("state", LargeBinary, nullable=False),
    Column("pinned", Boolean, nullable=False, default=False),
    UniqueConstraint("name", "version"),
    Index(None, "name", "pinned"),
)

#: Customers an erasure took out of the learners whose stored snapshots may still hold them: the
#: scrub job (:func:`cadence.engine.learning.scrub_snapshots`) rewrites the snapshots, then deletes
#: the row. The internal id alone (the customer row is gone).
learner_scrubs = Table(
    "learner_scrubs",
    metadata,
    Column("customer_id", BigInteger, primary_key=True, autoincrement=False),
    Column("erased_ms", BigInteger, nullable=False),
)

#: Committed decisions (``POST /v1/decisions`` with ``mode=commit``): what was decided,
#: the explanation, the inputs the learners need to learn from its feedback, and the
#: outcome so far (feedback kind -> first time seen), kept by the learner subscriber.
decisions = Table(
    "decisions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("customer_id", Id, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
    Column("decided_at_ms", BigInteger, nullable=False),
    Column("action", String(8), nullable=False),
    Column("campaign", String(200)),
    Column("channel", String(32)),
    Column("send_at_ms", BigInteger),
    Column("template", String(200)),
    Column("arm", String(200)),
    Column("ruleset_hash", String(128), nullable=False),
    # Read and written whole, never queried inside: kept as text (``json`` on PostgreSQL, compressed
    # with lz4 where the server has it: migration decisions_0003).
    Column("explanation", JsonText, nullable=False),
    Column("inputs", JsonText, nullable=False),  # traits and zone at decision time
    Column("outcome", JsonText, nullable=False),
    # How far the deciding process's learners had read the event log when they computed the
    # decision's features (NULL: made before position_0001, or it sends nothing): a replay registers
    # the decision there, as the live learners did, whatever its ``decided_at_ms``.
    Column("learner_position", BigInteger),
    # What the dashboard's decision mix counts, so it reads two short columns rather than the
    # explanation (NULL: recorded before arms_0001, read from the explanation then): whether the
    # chosen candidate was explored, and the reasons of the suppressions, space-separated.
    Column("explored", Boolean),
    Column("suppressed", Text),
    Index(None, "customer_id", "decided_at_ms"),
    Index(
        "ix_decisions_learner_position",
        "learner_position",
        sqlite_where=text("learner_position IS NOT NULL"),
        postgresql_where=text("learner_position IS NOT NULL"),
    ),
)

#: Each customer's first assignment to an arm of each campaign with a holdout arm: the customer
#: (by the stable hash) is in the holdout arm (``held``) or a sending one, from ``first_ms`` (the
#: decision's time) on, whether or not a message went. Written with the decision that assigned it
#: (an API commit, a scheduled push); what a holdout lift counts (:mod:`cadence.engine.assignments`).
arm_assignments = Table(
    "arm_assignments",
    metadata,
    Column("campaign", String(200), primary_key=True),
    Column("customer_id", Id, ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True),
    Column("first_ms", BigInteger, nullable=False),
    Column("held", Boolean, nullable=False),
    # A range's arms are counted by (campaign, arm) through this index alone.
    Index(None, "campaign", "held", "first_ms"),
    Index(None, "customer_id"),
)
