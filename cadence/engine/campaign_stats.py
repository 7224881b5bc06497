"""Per-campaign daily feedback counts, kept by the engine loop, for the campaigns page.

:class:`CampaignStatsSubscriber` counts every feedback event (``Message Sent``,
``Email Opened``, ``Unsubscribed``, ... see :data:`cadence.channels.FEEDBACK_EVENTS`)
by ``properties.campaign``, channel, UTC day and kind into ``campaign_daily``.
:func:`campaign_stats` reads those counts back for a date range, and
:func:`queue_outcomes` counts the send queue's rows that did not go out (suppressed at
dispatch, failed, expired, still queued), by campaign and channel: the sent rows,
which are the bulk of the queue, are never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, select

from cadence.channels import IMPLIED_CHANNEL, Feedback, feedback_kind
from cadence.engine.events import LoggedEvent
from cadence.store.fast import execute_many
from cadence.store.schema.dashboard import campaign_daily
from cadence.store.schema.sends import sends

__all__ = ["KINDS", "CampaignStats", "CampaignStatsSubscriber", "campaign_stats", "queue_outcomes"]

DAY_MS = 86_400_000
#: Feedback kinds in funnel order.
KINDS: tuple[str, ...] = tuple(k.value for k in Feedback)
#: Send-queue statuses that mean a message did not (yet) go out.
UNSENT_STATUSES = ("queued", "failed", "suppressed", "expired")

_UPSERT = (
    "INSERT INTO campaign_daily (campaign, channel, day, kind, count) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (campaign, channel, day, kind) DO UPDATE SET count = campaign_daily.count + excluded.count"
)


def feedback_key(event: LoggedEvent) -> tuple[str, str, int, str] | None:
    """(campaign, channel, day, kind) counted for ``event``, or None if it is not feedback.

    >>> e = LoggedEvent(1, "m", "track", "Email Opened", "u", None, 1, 86_400_000 * 3, "api",
    ...                 {"properties": {"campaign": "spring"}})
    >>> feedback_key(e)
    ('spring', 'email', 3, 'opened')
    >>> feedback_key(LoggedEvent(2, "m", "track", "Order Completed", "u", None, 1, 0, "api", {})) is None
    True
    """
    if event.type != "track":
        return None
    kind = feedback_kind(event.event)
    if kind is None:
        return None
    props = event.properties
    channel = props.get("channel") or IMPLIED_CHANNEL.get(event.event or "") or ""
    campaign = props.get("campaign") or ""
    return str(campaign)[:200], str(channel)[:32], event.ts_ms // DAY_MS, kind.value


@dataclass
class CampaignStatsSubscriber:
    """The engine-loop subscriber that keeps ``campaign_daily``."""

    runtime: Any = None
    name: str = "campaign_stats"

    def start(self, conn: Connection, checkpoint: int) -> int:
        """State is in the database: resume from the stored checkpoint."""
        return checkpoint

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        """Add the batch's feedback events to the daily counts."""
        counts: dict[tuple[str, str, int, str], int] = {}
        for event in batch:
            key = feedback_key(event)
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
        execute_many(conn, _UPSERT, [(*k, n) for k, n in sorted(counts.items())])

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        """Counts hold no customer: nothing to fold."""

    def erased(self, conn: Connection, customer_id: int) -> None:
        """Counts hold no customer, and an erased customer's past sends still happened."""


@dataclass
class CampaignStats:
    """Feedback counts of a date range, ready for tables and charts."""

    days: list[int]  # every UTC day of the range, ascending
    # (campaign, channel) -> kind -> total over the range
    totals: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    # kind -> day -> count, over every campaign
    daily: dict[str, dict[int, int]] = field(default_factory=dict)
    # campaign -> day -> sent
    sent_by_campaign: dict[str, dict[int, int]] = field(default_factory=dict)

    def channel_totals(self) -> dict[str, dict[str, int]]:
        """Kind totals per channel, over every campaign."""
        out: dict[str, dict[str, int]] = {}
        for (_campaign, channel), kinds in self.totals.items():
            acc = out.setdefault(channel, {})
            for kind, n in kinds.items():
                acc[kind] = acc.get(kind, 0) + n
        return out


def campaign_stats(conn: Connection, *, since_day: int, until_day: int) -> CampaignStats:
    """Feedback counts per campaign and channel, and per day, for ``since_day..until_day`` (UTC days)."""
    if until_day < since_day:
        raise ValueError(f"the range ends (day {until_day}) before it starts (day {since_day})")
    stats = CampaignStats(days=list(range(since_day, until_day + 1)))
    rows = conn.execute(
        select(
            campaign_daily.c.campaign,
            campaign_daily.c.channel,
            campaign_daily.c.day,
            campaign_daily.c.kind,
            campaign_daily.c.count,
        ).where(campaign_daily.c.day >= since_day, campaign_daily.c.day <= until_day)
    )
    for campaign, channel, day, kind, count in rows:
        n = int(count)
        acc = stats.totals.setdefault((campaign, channel), {})
        acc[kind] = acc.get(kind, 0) + n
        per_day = stats.daily.setdefault(kind, {})
        per_day[day] = per_day.get(day, 0) + n
        if kind == Feedback.SENT:
            by_day = stats.sent_by_campaign.setdefault(campaign, {})
            by_day[day] = by_day.get(day, 0) + n
    return stats


def queue_outcomes(conn: Connection) -> dict[tuple[str, str], dict[str, int]]:
    """Send-queue rows that did not go out, per (campaign, channel) and status.

    Reads only rows whose status is in :data:`UNSENT_STATUSES`, through the queue's
    (status, due_ms) index.
    """
    out: dict[tuple[str, str], dict[str, int]] = {}
    rows = conn.execute(
        select(sends.c.campaign, sends.c.channel, sends.c.status, func.count())
        .where(sends.c.status.in_(UNSENT_STATUSES))
        .group_by(sends.c.campaign, sends.c.channel, sends.c.status)
    )
    for campaign, channel, status, n in rows:
        out.setdefault((campaign, channel), {})[status] = int(n)
    return out
