"""Connector state: the dry-run outbox, provider message statuses, circuit breakers.

``outbox`` is where the default dry-run connector records every would-be send (one row
per send, unique by idempotency key, so a retried dry run never records twice).
``provider_messages`` keeps the furthest status each provider message reached (Twilio
callbacks arrive out of order: statuses only move forward). ``connector_state`` keeps
each connector's circuit breaker, so operators (and ``cadence plugins list``) see a
paused connector.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from cadence.store.schema.base import Id, Json, metadata

__all__ = ["connector_state", "outbox", "provider_messages"]

outbox = Table(
    "outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(200), nullable=False),
    Column("send_id", BigInteger),
    Column("channel", String(32), nullable=False),
    Column("campaign", String(200), nullable=False),
    Column("decision_id", String(64)),
    Column("customer_id", BigInteger, nullable=False),
    Column("message", Json, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    UniqueConstraint("idempotency_key"),
)

provider_messages = Table(
    "provider_messages",
    metadata,
    Column("connector", String(64), nullable=False),
    Column("provider_message_id", String(200), nullable=False),
    Column("status", String(32), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("error_code", String(32)),
    Column("updated_ms", BigInteger, nullable=False),
    PrimaryKeyConstraint("connector", "provider_message_id"),
)

connector_state = Table(
    "connector_state",
    metadata,
    Column("connector", String(64), primary_key=True),
    Column("circuit", String(16), nullable=False),  # closed | open | half_open
    Column("failures", Integer, nullable=False),
    Column("open_until_ms", BigInteger),
    Column("last_error", Text),
    Column("updated_ms", BigInteger, nullable=False),
)
