"""Tables behind the dashboard: per-campaign daily feedback counts, and the UI's secrets.

``campaign_daily`` is kept by :class:`~cadence.engine.campaign_stats.CampaignStatsSubscriber`
in the engine loop: one row per UTC day, campaign and channel with a count per feedback
kind (``sent``, ``delivered``, ``opened``, ``clicked``, ``bounced``, ``failed``,
``unsubscribed``, ``spam_report``, ``converted``), and the messages cadence's dispatcher sent
(``dispatched``, counted by the dispatcher as it records them), so the campaigns page reads a few
rows per campaign and day instead of the event log. ``ui_secrets`` holds the key that signs session cookies when
the settings give none.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, String, Table, Text, text

from cadence.store.schema.base import metadata
from cadence.store.schema.core import customers
from cadence.store.schema.decisions import decisions

#: The count columns of ``campaign_daily``: the values of :class:`cadence.channels.Feedback`.
FEEDBACK_KINDS = (
    "sent",
    "delivered",
    "opened",
    "clicked",
    "bounced",
    "failed",
    "unsubscribed",
    "spam_report",
    "converted",
)

__all__ = ["FEEDBACK_KINDS", "campaign_daily", "ui_secrets"]

campaign_daily = Table(
    "campaign_daily",
    metadata,
    # The day leads the key: every read is a range of days.
    Column("day", Integer, primary_key=True),  # days since 1970-01-01 UTC
    Column("campaign", String(200), primary_key=True),  # "" when the feedback names none
    Column("channel", String(32), primary_key=True),
    # One count per feedback kind (cadence.channels.Feedback), so a day is one row per campaign.
    *(Column(kind, BigInteger, nullable=False, default=0) for kind in FEEDBACK_KINDS),
    # Messages cadence's dispatcher handed to a connector that took them (the outbox included),
    # by the UTC day it did: written with the send's outcome, not by the engine loop.
    Column("dispatched", BigInteger, nullable=False, server_default=text("0")),
    sqlite_with_rowid=False,  # clustered on the key: a range of days is one sequential read
)

ui_secrets = Table(
    "ui_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)

#: The campaigns and attribution pages read the decisions of a date range (exploration
#: share, suppressions, holdout lift).
Index("ix_decisions_decided_at_ms", decisions.c.decided_at_ms)
#: Looking a customer up lists the ids of the customers merged into it
#: (:func:`cadence.engine.identity.identities_of`): without this, a scan of every customer.
Index("ix_customers_merged_into", customers.c.merged_into)
