"""Attribution aggregates kept incrementally by the engine loop.

``attribution_touches`` holds each customer's *open* journey per attribution block
(touches since their last conversion, at most 90 days old): it is all a conversion
needs to be credited, so no query and no conversion ever rescans the event log.
``attribution_history`` keeps the conversions and the touches they closed for 180 days, so
that an event logged after a later conversion re-credits what it changes.
When a conversion arrives, every rule-based model's credit is added to
``attribution_credits`` (per block, model, window, UTC day, channel and campaign), the
journey's channel set to ``attribution_coalitions`` and its path to
``attribution_paths`` (Shapley and Markov are solved from those tallies at query
time), and the journey is closed.

Models that cannot be credited per event (the causal model, fitted on every
customer's exposures; Shapley, ordered Shapley and Markov, solved from the tallies and
the open journeys) are *materialised*: ``attribution_exposures`` keeps every touch and
conversion of the last 90 days (the causal model's input), and the leader's refresh
writes each model's credit to ``attribution_fits`` with the event-log position and the
time it reflects (:mod:`cadence.engine.attribution.materialized`).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, ForeignKey, Index, Integer, String, Table

from cadence.store.schema.base import Id, Json, metadata

__all__ = [
    "attribution_campaign_credits",
    "attribution_channel_credits",
    "attribution_coalitions",
    "attribution_credits",
    "attribution_exposures",
    "attribution_fits",
    "attribution_history",
    "attribution_paths",
    "attribution_touches",
]

attribution_touches = Table(
    "attribution_touches",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("spec", String(100), nullable=False),
    Column("customer_id", Id, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
    Column("ts_ms", BigInteger, nullable=False),
    Column("channel", String(64), nullable=False),
    Column("campaign", String(200), nullable=False, default=""),
    Column("event_id", BigInteger, nullable=False),
    Index(None, "spec", "customer_id", "ts_ms"),
)

#: Each customer's credited conversions and the touches they closed, the last 180 days, per
#: block: what re-credits those conversions when an earlier touch (or conversion) is logged
#: after them (webhooks that arrive late, clicks imported after the orders).
attribution_history = Table(
    "attribution_history",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("spec", String(100), nullable=False),
    Column("customer_id", Id, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
    Column("ts_ms", BigInteger, nullable=False),
    Column("channel", String(64), nullable=False),  # "" for a conversion
    Column("campaign", String(200), nullable=False, default=""),
    Column("value", Float, nullable=False, default=0.0),  # a conversion's value
    Column("event_id", BigInteger, nullable=False),
    # The event id of the conversion that closed the touch (a conversion's own): the journey
    # it was credited with, whatever merges happened since.
    Column("closed_by", BigInteger, nullable=False),
    Index(None, "spec", "customer_id", "ts_ms"),
    Index(None, "spec", "ts_ms"),
)

attribution_credits = Table(
    "attribution_credits",
    metadata,
    Column("spec", String(100), primary_key=True),
    Column("model", String(32), primary_key=True),
    Column("window_days", Integer, primary_key=True),
    Column("day", Integer, primary_key=True),  # UTC day number of the conversion
    Column("channel", String(64), primary_key=True),  # "" for conversions with no touch
    Column("campaign", String(200), primary_key=True),
    Column("conversions", Float, nullable=False, default=0.0),
    Column("value", Float, nullable=False, default=0.0),
)

#: The same credit without the campaign: what channel and day queries read (15 rows a
#: day instead of channels x campaigns), so a long date range stays fast.
attribution_channel_credits = Table(
    "attribution_channel_credits",
    metadata,
    Column("spec", String(100), primary_key=True),
    Column("model", String(32), primary_key=True),
    Column("window_days", Integer, primary_key=True),
    Column("day", Integer, primary_key=True),
    Column("channel", String(64), primary_key=True),
    Column("conversions", Float, nullable=False, default=0.0),
    Column("value", Float, nullable=False, default=0.0),
)

#: The same credit without the channel: what campaign queries (the dashboard's campaigns
#: page) read, so they do not group channels x campaigns rows per day.
attribution_campaign_credits = Table(
    "attribution_campaign_credits",
    metadata,
    Column("spec", String(100), primary_key=True),
    Column("model", String(32), primary_key=True),
    Column("window_days", Integer, primary_key=True),
    Column("day", Integer, primary_key=True),
    Column("campaign", String(200), primary_key=True),
    Column("conversions", Float, nullable=False, default=0.0),
    Column("value", Float, nullable=False, default=0.0),
)

attribution_coalitions = Table(
    "attribution_coalitions",
    metadata,
    Column("spec", String(100), primary_key=True),
    Column("window_days", Integer, primary_key=True),
    Column("channels", String(1000), primary_key=True),  # sorted distinct channels joined by "+"
    Column("journeys", Float, nullable=False, default=0.0),
    Column("conversions", Float, nullable=False, default=0.0),
)

attribution_paths = Table(
    "attribution_paths",
    metadata,
    Column("spec", String(100), primary_key=True),
    Column("window_days", Integer, primary_key=True),
    Column("path", String(2000), primary_key=True),  # a converting journey's channels joined by ">"
    Column("conversions", Float, nullable=False, default=0.0),
)

#: Every touch and conversion of the last 90 days, per block: what a causal fit reads.
attribution_exposures = Table(
    "attribution_exposures",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("spec", String(100), nullable=False),
    Column("customer_id", Id, ForeignKey("customers.id", ondelete="CASCADE"), nullable=False),
    Column("ts_ms", BigInteger, nullable=False),
    Column("channel", String(64), nullable=False),  # "" for a conversion
    Column("value", Float, nullable=False, default=0.0),  # a conversion's value
    Index(None, "spec", "ts_ms"),
    Index(None, "customer_id"),
)

#: Materialised model credit: one row per block, model and window, replaced at each refresh.
attribution_fits = Table(
    "attribution_fits",
    metadata,
    Column("spec", String(100), primary_key=True),
    Column("model", String(32), primary_key=True),
    Column("window_days", Integer, primary_key=True),
    Column("position", BigInteger, nullable=False),  # the last event id the fit reflects
    Column("fitted_ms", BigInteger, nullable=False),  # wall-clock time of the refresh
    Column("data_end_ms", BigInteger, nullable=False),  # the newest event time it saw
    Column("seconds", Float, nullable=False),  # how long the refresh took
    Column("result", Json, nullable=False),
)
