"""Tables behind the dashboard: per-campaign daily feedback counts, and the UI's secrets.

``campaign_daily`` is kept by :class:`~cadence.engine.campaign_stats.CampaignStatsSubscriber`
in the engine loop: one row per campaign, channel, UTC day and feedback kind (``sent``,
``delivered``, ``opened``, ``clicked``, ``bounced``, ``failed``, ``unsubscribed``,
``spam_report``, ``converted``), so the campaigns page reads a few hundred rows
instead of the event log. ``ui_secrets`` holds the key that signs session cookies when
the settings give none.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Integer, String, Table, Text

from cadence.store.schema.base import metadata

__all__ = ["campaign_daily", "ui_secrets"]

campaign_daily = Table(
    "campaign_daily",
    metadata,
    Column("campaign", String(200), primary_key=True),  # "" when the feedback names none
    Column("channel", String(32), primary_key=True),
    Column("day", Integer, primary_key=True),  # days since 1970-01-01 UTC
    Column("kind", String(16), primary_key=True),  # a cadence.channels.Feedback value
    Column("count", BigInteger, nullable=False),
)

ui_secrets = Table(
    "ui_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)
