"""Per-campaign daily feedback counts, kept by the engine loop, for the campaigns page.

:class:`CampaignStatsSubscriber` counts every feedback event (``Message Sent``,
``Email Opened``, ``Unsubscribed``, ... see :data:`cadence.channels.FEEDBACK_EVENTS`)
by UTC day, ``properties.campaign`` and channel into ``campaign_daily`` (a count
column per kind); the dispatcher adds the messages it sent (:func:`count_dispatched`).
:func:`campaign_stats` reads those counts back for a date range, and
:func:`queue_outcomes` counts the send queue's rows that did not go out (suppressed at
dispatch, failed, expired, still queued), by campaign and channel: the sent rows,
which are the bulk of the queue, are never read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from cadence.channels import Feedback, feedback_campaign, feedback_channel, feedback_kind
from cadence.engine.events import LoggedEvent
from cadence.store.fast import dialect_sql, execute_many
from cadence.store.schema.dashboard import FEEDBACK_KINDS
from cadence.store.schema.sends import UNSENT_WHERE

__all__ = [
    "KINDS",
    "CampaignStats",
    "CampaignStatsSubscriber",
    "campaign_stats",
    "count_dispatched",
    "queue_outcomes",
]

DAY_MS = 86_400_000
#: Feedback kinds, one count column each.
KINDS: tuple[str, ...] = FEEDBACK_KINDS
#: Send-queue statuses that mean a message did not (yet) go out.
UNSENT_STATUSES = ("queued", "failed", "suppressed", "expired")  # as in UNSENT_WHERE

_UPSERT = (
    f"INSERT INTO campaign_daily (day, campaign, channel, {', '.join(KINDS)}) "
    f"VALUES (?, ?, ?, {', '.join('?' for _ in KINDS)}) ON CONFLICT (day, campaign, channel) DO UPDATE SET "
    + ", ".join(f"{k} = campaign_daily.{k} + excluded.{k}" for k in KINDS)
)


def feedback_key(event: LoggedEvent) -> tuple[str, str, int, str] | None:
    """(campaign, channel, day, kind) counted for ``event``, or None if it is not feedback.

    >>> e = LoggedEvent(1, "m", "track", "Email Opened", "u", None, 1, 86_400_000 * 3, "api",
    ...                 {"properties": {"campaign": "spring"}})
    >>> feedback_key(e)
    ('spring', 'email', 3, 'opened')
    >>> feedback_key(LoggedEvent(2, "m", "track", "Order Completed", "u", None, 1, 0, "api", {})) is None
    True
    >>> feedback_key(LoggedEvent(3, "m", "track", "Message Sent", "u", None, 1, 0, "api",
    ...                          {"properties": {"campaign": ["spring"], "channel": "SMS"}}))
    ('', 'sms', 0, 'sent')
    """
    if event.type != "track":
        return None
    kind = feedback_kind(event.event)
    if kind is None:
        return None
    props = event.properties
    channel = feedback_channel(event.event, props) or ""
    return feedback_campaign(props)[:200], channel[:32], event.ts_ms // DAY_MS, kind.value


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
        column = {k: i for i, k in enumerate(KINDS)}
        counts: dict[tuple[int, str, str], list[int]] = {}
        for event in batch:
            key = feedback_key(event)
            if key is not None:
                campaign, channel, day, kind = key
                counts.setdefault((day, campaign, channel), [0] * len(KINDS))[column[kind]] += 1
        execute_many(conn, _UPSERT, [(*k, *n) for k, n in sorted(counts.items())])

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
    # campaign -> day -> sent (only the top campaigns when ``campaign_stats`` is asked for them)
    sent_by_campaign: dict[str, dict[int, int]] = field(default_factory=dict)

    def channel_totals(self) -> dict[str, dict[str, int]]:
        """Kind totals per channel, over every campaign."""
        out: dict[str, dict[str, int]] = {}
        for (_campaign, channel), kinds in self.totals.items():
            acc = out.setdefault(channel, {})
            for kind, n in kinds.items():
                acc[kind] = acc.get(kind, 0) + n
        return out


#: Messages known to have gone out, per day, campaign and channel: the largest of the ``Message Sent``
#: reports, the deliveries reported (a message delivered was sent) and the messages cadence's
#: dispatcher handed to a connector (``dispatched``). Many apps and providers report deliveries
#: only (cadence's own ``simulate --via-api`` does), and the dry-run outbox reports nothing:
#: counting the sent reports alone showed "Sent 0" and no rates beside thousands of deliveries and
#: clicks (an outside check). The largest, not the sum: the reports are mostly of the same messages.
_SENT = (
    "CASE WHEN dispatched >= sent AND dispatched >= delivered THEN dispatched "
    "WHEN delivered > sent THEN delivered ELSE sent END"
)

_UPSERT_DISPATCHED = (
    f"INSERT INTO campaign_daily (day, campaign, channel, {', '.join(KINDS)}, dispatched) "
    f"VALUES (?, ?, ?, {', '.join('0' for _ in KINDS)}, ?) ON CONFLICT (day, campaign, channel) "
    "DO UPDATE SET dispatched = campaign_daily.dispatched + excluded.dispatched"
)


def count_dispatched(conn: Connection, now_ms: int, sent: Iterable[tuple[str, str]]) -> None:
    """Count the messages the dispatcher recorded as sent at ``now_ms``, each a (campaign, channel).

    Called in the transaction that records them, so a count is never lost nor doubled.
    """
    counts = Counter((campaign[:200], channel[:32]) for campaign, channel in sent)
    day = now_ms // DAY_MS
    execute_many(conn, _UPSERT_DISPATCHED, [(day, c, ch, n) for (c, ch), n in sorted(counts.items())])


def campaign_stats(
    conn: Connection, *, since_day: int, until_day: int, top_campaigns: int | None = None
) -> CampaignStats:
    """Feedback counts per campaign and channel, and per day, for ``since_day..until_day`` (UTC days).

    ``sent`` counts the messages known to have gone out (:data:`_SENT`), every other kind its events.

    The database sums (three grouped range scans: per campaign and channel, per day,
    and sends per campaign and day), so Python handles a few hundred rows however
    long the range. ``top_campaigns`` keeps the per-day sends of only the campaigns
    with the most sends in the range.
    """
    if until_day < since_day:
        raise ValueError(f"the range ends (day {until_day}) before it starts (day {since_day})")
    stats = CampaignStats(days=list(range(since_day, until_day + 1)))
    sums = ", ".join(f"SUM({_SENT if k == Feedback.SENT.value else k})" for k in KINDS)
    where = "WHERE day >= ? AND day <= ?"
    params = (since_day, until_day)
    for campaign, channel, *counts in conn.exec_driver_sql(
        dialect_sql(
            conn, f"SELECT campaign, channel, {sums} FROM campaign_daily {where} GROUP BY campaign, channel"
        ),
        params,
    ):
        stats.totals[(campaign, channel)] = {k: int(n or 0) for k, n in zip(KINDS, counts, strict=True)}
    for day, *counts in conn.exec_driver_sql(
        dialect_sql(conn, f"SELECT day, {sums} FROM campaign_daily {where} GROUP BY day"), params
    ):
        for kind, n in zip(KINDS, counts, strict=True):
            if n:
                stats.daily.setdefault(kind, {})[int(day)] = int(n)
    sent = Feedback.SENT.value
    by_campaign: dict[str, int] = {}
    for (campaign, _channel), kinds in stats.totals.items():
        if kinds[sent]:
            by_campaign[campaign] = by_campaign.get(campaign, 0) + kinds[sent]
    wanted = sorted(by_campaign, key=lambda c: (-by_campaign[c], c))
    if top_campaigns is not None:
        wanted = wanted[:top_campaigns]
    if wanted:
        marks = ", ".join("?" for _ in wanted)
        for campaign, day, n in conn.exec_driver_sql(
            dialect_sql(
                conn,
                f"SELECT campaign, day, SUM({_SENT}) FROM campaign_daily {where} AND campaign IN ({marks}) "
                f"AND {_SENT} > 0 GROUP BY campaign, day",
            ),
            (*params, *wanted),
        ):
            stats.sent_by_campaign.setdefault(campaign, {})[int(day)] = int(n)
    return stats


def queue_outcomes(conn: Connection) -> dict[tuple[str, str], dict[str, int]]:
    """Send-queue rows that did not go out, per (campaign, channel) and status.

    Counted from the partial index ``ix_sends_unsent`` alone (rows whose status is in
    :data:`UNSENT_STATUSES`): the sent rows, the bulk of the queue, are never read.
    """
    out: dict[tuple[str, str], dict[str, int]] = {}
    rows = conn.exec_driver_sql(
        f"SELECT campaign, channel, status, COUNT(*) FROM sends WHERE {UNSENT_WHERE} "
        "GROUP BY status, campaign, channel"
    )
    for campaign, channel, status, n in rows:
        out.setdefault((campaign, channel), {})[status] = int(n)
    return out
