"""Core tables: the event log, customers and identities, profiles, consent, checkpoints.

Times are stored as integer milliseconds since the Unix epoch (UTC) in columns named
``*_ms``: portable between SQLite and PostgreSQL, cheap to compare and to bucket.

The event log (``events``) is append-only; everything else is derived from it by the
engine loop, except ``api_keys`` and ``erasures`` (operator actions) and the
connector tables (``sends``), which record what was done in the outside world.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
    text,
)

from cadence.store.schema.base import Id, Json, JsonText, metadata


def Key(length: int) -> String:  # noqa: N802 - a column type, named like one
    """A string compared byte by byte: ids and event names (``COLLATE "C"`` on PostgreSQL).

    The engine loop inserts several keys per event into these primary keys; comparing
    them under the database's locale (``C.UTF-8``, ``en_US.UTF-8``) cost PostgreSQL up to
    40% of the insert. SQLite compares bytes anyway.
    """
    return String(length).with_variant(String(length, collation="C"), "postgresql")  # type: ignore[return-value]


__all__ = [
    "api_keys",
    "checkpoints",
    "consent",
    "customers",
    "engine_quarantine",
    "erasures",
    "events",
    "identities",
    "profile_daily",
    "profile_event_stats",
    "profiles",
]

events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # Byte-wise (``COLLATE "C"`` on PostgreSQL): every append inserts them into an index.
    Column("message_id", Key(100), nullable=False),
    Column("type", String(16), nullable=False),
    Column("event", String(200)),
    Column("user_id", Key(200)),
    Column("anonymous_id", Key(200)),
    Column("ts_ms", BigInteger, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    Column("source", String(64), nullable=False),
    # Read whole, never queried inside: kept as its text (``json`` on PostgreSQL, not ``jsonb``).
    Column("payload", JsonText, nullable=False),
    UniqueConstraint("message_id"),
    # Only where set: the privacy look-ups never look for NULL, and appends skip the entry.
    Index(
        "ix_events_user_id",
        "user_id",
        sqlite_where=text("user_id IS NOT NULL"),
        postgresql_where=text("user_id IS NOT NULL"),
    ),
    Index(
        "ix_events_anonymous_id",
        "anonymous_id",
        sqlite_where=text("anonymous_id IS NOT NULL"),
        postgresql_where=text("anonymous_id IS NOT NULL"),
    ),
    # Ids are never given twice (an erasure deletes the newest events; SQLite would reuse
    # their ids, below the loop's position): migration ids_0001.
    sqlite_autoincrement=True,
)

customers = Table(
    "customers",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("created_ms", BigInteger, nullable=False),
    # Set when this customer was stitched into another one; reads follow the chain.
    Column("merged_into", Id, ForeignKey("customers.id", ondelete="SET NULL")),
    # The event whose stitching merged it (NULL: not merged, or merged before stitch_0001): the
    # learners fold a merge where the log made it, so a replay learns what the live learner did.
    Column("merged_at_event", BigInteger),
    Index(
        "ix_customers_merged_at_event",
        "merged_at_event",
        sqlite_where=text("merged_at_event IS NOT NULL"),
        postgresql_where=text("merged_at_event IS NOT NULL"),
    ),
)

identities = Table(
    "identities",
    metadata,
    Column("kind", Key(16), nullable=False),  # "user" or "anonymous"
    Column("value", Key(200), nullable=False),
    # No foreign key: the loop inserts a row per new id and PostgreSQL's per-row key check cost
    # 40% of it; erasure deletes a customer's identities itself, before the customer.
    Column("customer_id", Id, nullable=False),
    Column("first_seen_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("kind", "value"),
    Index(None, "customer_id"),
    # The loop's look-ups and inserts by key walk one b-tree on SQLite, not the key's then the table's.
    sqlite_with_rowid=False,
)

# The profile aggregates carry no foreign key to ``customers``: they are derived state that
# the engine loop writes several rows of per event, and PostgreSQL's per-row key check cost
# more than the write itself. Erasure deletes them explicitly (``ProfilesSubscriber.erased``)
# under the loop's batch lock, and merges move them, so no row outlives its customer.
profiles = Table(
    "profiles",
    metadata,
    Column("customer_id", Id, primary_key=True),
    Column("first_seen_ms", BigInteger, nullable=False),
    Column("last_seen_ms", BigInteger, nullable=False),
    Column("event_count", BigInteger, nullable=False, default=0),
    Column("traits", Json, nullable=False, default=dict),
    # trait -> id of the event that last set it: merges keep the latest value of each.
    Column("trait_events", Json, nullable=False, default=dict),
    Column("timezone", String(64)),
    Column("updated_event_id", BigInteger, nullable=False, default=0),
)

profile_event_stats = Table(
    "profile_event_stats",
    metadata,
    Column("customer_id", Id, nullable=False),
    Column("event", Key(200), nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("sum_value", Float, nullable=False),
    Column("first_ms", BigInteger, nullable=False),
    Column("last_ms", BigInteger, nullable=False),
    Column("last_value", Float),
    PrimaryKeyConstraint("customer_id", "event"),
    sqlite_with_rowid=False,  # upserts by key walk one b-tree (see identities)
)

profile_daily = Table(
    "profile_daily",
    metadata,
    Column("customer_id", Id, nullable=False),
    Column("event", Key(200), nullable=False),
    Column("day", Integer, nullable=False),  # days since 1970-01-01 UTC
    Column("count", BigInteger, nullable=False),
    Column("sum_value", Float, nullable=False),
    PrimaryKeyConstraint("customer_id", "event", "day"),
    sqlite_with_rowid=False,  # upserts by key walk one b-tree (see identities)
)

consent = Table(
    "consent",
    metadata,
    Column("customer_id", Id, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
    Column("channel", String(32), nullable=False),
    Column("granted", Boolean, nullable=False),
    Column("source", String(64), nullable=False),
    Column("changed_ms", BigInteger, nullable=False),
    Column("event_id", BigInteger, nullable=False),
    PrimaryKeyConstraint("customer_id", "channel"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

#: Events the engine loop set aside: their batch failed on every try, and applied alone they
#: failed in these subscribers (``identity``: in every one). The loop went on past them;
#: ``cadence engine retry`` applies them again once the cause is fixed.
engine_quarantine = Table(
    "engine_quarantine",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", Id, ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    Column("subscriber", String(64), nullable=False),
    Column("error", String(2000), nullable=False),
    Column("quarantined_ms", BigInteger, nullable=False),
    Index(None, "event_id"),
)

erasures = Table(
    "erasures",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("requested_ms", BigInteger, nullable=False),
    Column("events_removed", Integer, nullable=False),
    Column("identities_removed", Integer, nullable=False),
    Column("requested_by", String(100), nullable=False),
    # The highest customer id when it ran: SQLite's new customer ids start after it (ids_0001).
    Column("customer_ids_to", BigInteger),
    # Removals from remote ad audiences it queued (``audience_removals``); 0 before erasure_0001.
    Column("audience_removals_queued", Integer, nullable=False, server_default="0"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("scopes", String(100), nullable=False),  # comma-separated
    Column("created_ms", BigInteger, nullable=False),
    Column("revoked_ms", BigInteger),
    UniqueConstraint("sha256"),
)
