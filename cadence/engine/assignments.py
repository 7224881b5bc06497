"""Holdout-arm assignments, written with each decision, and the holdout lift read from them.

A campaign with a holdout arm splits its customers by a stable hash of (campaign, customer):
the holdout arm never receives the campaign, the others may. A decision that reached the
campaign's split (past its start and end, trigger, ``audience`` and ``unless``) *assigned* the
customer an arm, whatever happened next (sent, capped, in quiet hours, without consent,
out-bid). ``arm_assignments`` keeps each customer's first assignment per such campaign, written
in the decision's own transaction (:data:`ASSIGN_ARMS`, :func:`arm_rows`): an API commit, a
batch, a scheduled push (held-out customers included, though a push records no decision for
them).

The lift (:func:`holdout_lifts`) is an intent-to-treat comparison of the customers who entered
the split in a range: each counts once, in the arm of their first assignment, and *converted*
when they have a conversion event at or after it and before the range's end. It reads two
grouped queries (the arms' sizes through the ``(campaign, held, first_ms)`` index; the converted
customers, the assigned ones joined to their conversion day buckets), not the decisions.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import Connection

from cadence.clock import now_ms
from cadence.engine.attribution.holdout import lift
from cadence.engine.attribution.online import KEEP_MS
from cadence.engine.attribution.spec import AttributionSpec
from cadence.engine.decision import Decision
from cadence.engine.identity import identities_of
from cadence.store.fast import array_literal, execute_many, fetch_in, fetch_rows, is_postgres, send

__all__ = [
    "ASSIGN_ARMS",
    "AssignmentsSubscriber",
    "arm_rows",
    "block_lifts",
    "converted_after",
    "holdout_lifts",
    "write_arms",
]

DAY_MS = 86_400_000

#: What every write of assignments ends with: a customer's earliest assignment of a campaign stays.
_KEEP_EARLIEST = (
    " ON CONFLICT (campaign, customer_id) DO UPDATE SET first_ms = excluded.first_ms, held = excluded.held"
    " WHERE excluded.first_ms < arm_assignments.first_ms"
)

#: One assignment (``?`` placeholders: campaign, decided ms, held, customer). The earliest stays,
#: whichever order decisions made ``at`` different times commit in; nothing is written for a
#: customer erased meanwhile (a push's held-out customers are not locked as its senders are).
ASSIGN_ARMS = (
    "INSERT INTO arm_assignments (campaign, customer_id, first_ms, held)"
    " SELECT CAST(? AS VARCHAR(200)), id, CAST(? AS BIGINT), CAST(? AS BOOLEAN) FROM customers WHERE id = ?"
    + _KEEP_EARLIEST
)


def arm_rows(decision: Decision, customer_id: int, decided_ms: int) -> list[tuple[str, int, bool, int]]:
    """:data:`ASSIGN_ARMS`' parameters for the arms ``decision`` drew (none for most decisions)."""
    return [(c, decided_ms, True, customer_id) for c in decision.holdout] + [
        (c, decided_ms, False, customer_id) for c in decision.assigned
    ]


# Many at once on PostgreSQL: one statement, one array per column (a scheduled push's chunk).
_ASSIGN_MANY_PG = (
    "INSERT INTO arm_assignments (campaign, customer_id, first_ms, held)"
    " SELECT r.campaign, c.id, r.first_ms, r.held"
    " FROM unnest(%s::text[], %s::bigint[], %s::boolean[], %s::bigint[]) AS r(campaign, first_ms, held, customer_id)"
    " JOIN customers c ON c.id = r.customer_id" + _KEEP_EARLIEST
)


def write_arms(conn: Connection, rows: Sequence[tuple[str, int, bool, int]]) -> None:
    """Write many :func:`arm_rows` (one per campaign and customer) as :data:`ASSIGN_ARMS` would, one by one.

    PostgreSQL gets one statement (a push's chunk of 2,000 customers took about 50 us a row as
    ``executemany``); SQLite runs ``executemany`` in-process anyway.
    """
    if not rows:
        return
    if not is_postgres(conn):
        execute_many(conn, ASSIGN_ARMS, rows)
        return
    # One row per (campaign, customer): a statement may not update a row twice. The earliest stays.
    first: dict[tuple[str, int], tuple[str, int, bool, int]] = {}
    for row in sorted(rows, key=lambda r: r[1]):
        first.setdefault((row[0], row[3]), row)
    rows = list(first.values())
    kinds = ("text", "bigint", "boolean", "bigint")
    send(
        conn,
        _ASSIGN_MANY_PG,
        tuple(array_literal(k, list(c)) for k, c in zip(kinds, zip(*rows, strict=True), strict=True)),
    )


#: A merged-away customer's assignments become the customer they joined's, the earliest staying:
#: the first exposure fixes the arm (intent to treat), whichever id it was made under.
_FOLD = (
    "INSERT INTO arm_assignments (campaign, customer_id, first_ms, held)"
    " SELECT campaign, ?, first_ms, held FROM arm_assignments WHERE customer_id = ?" + _KEEP_EARLIEST
)


class AssignmentsSubscriber:
    """Keeps ``arm_assignments`` with the customer a merge joined (the decisions write the rows).

    A visitor decided for anonymously and then identified is one customer: their conversions
    are folded into the customer they joined, and so is their assignment. An erasure removes
    the rows with the customer (``ON DELETE CASCADE``).
    """

    name = "arm_assignments"

    def __init__(self, runtime: object = None) -> None:
        del runtime

    def start(self, conn: Connection, checkpoint: int) -> int:
        """State is in the database: resume from the stored checkpoint."""
        return checkpoint

    def apply(self, conn: Connection, batch: Sequence[Any]) -> None:
        """Events change no assignment."""

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        self.merged_many(conn, [(winner, loser)])

    def merged_many(self, conn: Connection, merges: Sequence[tuple[int, int]]) -> None:
        """Move each loser's assignments to its winner (most losers have none: one read finds those that do)."""
        if not merges:
            return
        assigned = {
            c
            for (c,) in fetch_in(
                conn,
                "SELECT DISTINCT customer_id FROM arm_assignments WHERE customer_id IN_VALUES",
                [loser for _w, loser in merges],
            )
        }
        moves = [(winner, loser) for winner, loser in merges if loser in assigned]
        execute_many(conn, _FOLD, moves)
        execute_many(
            conn, "DELETE FROM arm_assignments WHERE customer_id = ?", [(loser,) for _w, loser in moves]
        )

    def erased(self, conn: Connection, customer_id: int) -> None:
        """The rows go with the customer's row (``ON DELETE CASCADE``)."""


_SIZES = (
    "SELECT campaign, held, COUNT(*) FROM arm_assignments WHERE first_ms >= ? AND first_ms < ?"
    " GROUP BY campaign, held"
)
_NEWEST_HISTORY = "SELECT MAX(ts_ms) FROM attribution_history WHERE spec = ?"
# The block's conversions in the range (by its (spec, ts_ms) index), each joined to the
# customer's assignments made at or before it; a customer counted once per campaign.
_CONVERTED = (
    "SELECT a.campaign, a.held, COUNT(DISTINCT a.customer_id) FROM attribution_history h"
    " JOIN arm_assignments a ON a.customer_id = h.customer_id AND a.first_ms <= h.ts_ms"
    " WHERE h.spec = ? AND h.channel = '' AND h.ts_ms >= ? AND h.ts_ms < ?"
    " AND a.first_ms >= ? AND a.first_ms < ?"
    " GROUP BY a.campaign, a.held"
)
# Integer division on both databases: the day of the first assignment.
_CONVERTED_BY_DAYS = (
    "SELECT a.campaign, a.customer_id, a.first_ms, a.held, MAX(d.day) FROM arm_assignments a"
    " JOIN profile_daily d ON d.customer_id = a.customer_id AND d.event = ?"
    " AND d.day >= a.first_ms / 86400000 AND d.day <= ? AND d.count > 0"
    " WHERE a.first_ms >= ? AND a.first_ms < ?"
    " GROUP BY a.campaign, a.customer_id, a.first_ms, a.held"
)


def holdout_lifts(
    conn: Connection,
    *,
    since_ms: int,
    until_ms: int,
    spec: str = "default",
    conversion_event: str = "Order Completed",
) -> list[dict[str, Any]]:
    """Measured lift per campaign with a holdout arm, over the customers first assigned in ``[since_ms, until_ms)``.

    Each customer counts once, in the arm of their first assignment ever (a customer who
    entered the split before ``since_ms`` belongs to an earlier range's cohort), and is
    *converted* with a conversion of the attribution block ``spec`` (its ``conversion_event``)
    at or after it and before ``until_ms``. The arms are independent samples of customers, so
    the interval is the one of a difference of two proportions
    (:func:`~cadence.engine.attribution.holdout.lift`). A campaign with customers in one arm
    only has no row.

    The conversions come from the block's ``attribution_history`` (indexed by time: the range's
    conversions, each joined to the customer's assignments), which holds every conversion of at
    least its last :data:`~cadence.engine.attribution.online.KEEP_MS` (90 days); customers
    assigned before that are looked up in their conversion day buckets (:func:`converted_after`).
    """
    sizes: dict[tuple[str, bool], int] = {}
    for campaign, held, n in fetch_rows(conn, _SIZES, (since_ms, until_ms)):
        sizes[(campaign, bool(held))] = int(n)
    if not sizes:
        return []
    converted: dict[tuple[str, bool], int] = {}
    (newest,) = fetch_rows(conn, _NEWEST_HISTORY, (spec,))[0]
    # The history holds every conversion from KEEP_MS before the later of now and its newest row
    # (it is pruned HISTORY_KEEP_MS behind the newest event the block saw: a margin of RECREDIT_MS
    # for events logged up to that far ahead of both).
    kept_since = until_ms if newest is None else max(since_ms, max(now_ms(), int(newest)) - KEEP_MS)
    if kept_since < until_ms:
        for campaign, held, n in fetch_rows(
            conn, _CONVERTED, (spec, kept_since, until_ms, kept_since, until_ms)
        ):
            converted[(campaign, bool(held))] = int(n)
    if since_ms < kept_since:  # assigned before the history's reach (or with no history): their day buckets
        _converted_by_days(conn, converted, since_ms, min(kept_since, until_ms), until_ms, conversion_event)
    out = []
    for campaign in sorted({c for c, _held in sizes}):
        n_t, n_h = sizes.get((campaign, False), 0), sizes.get((campaign, True), 0)
        if not (n_t and n_h):
            continue
        measured = lift(
            campaign,
            treated=n_t,
            treated_conv=converted.get((campaign, False), 0),
            held_out=n_h,
            held_out_conv=converted.get((campaign, True), 0),
        )
        out.append(
            {
                "campaign": campaign,
                "treated": n_t,
                "held_out": n_h,
                "treated_rate": measured.treated_rate,
                "held_out_rate": measured.held_out_rate,
                "difference": measured.difference,
                "low": measured.low,
                "high": measured.high,
                "incremental": measured.incremental,
            }
        )
    return out


def block_lifts(
    conn: Connection, block: AttributionSpec, *, since_day: int, until_day: int
) -> list[dict[str, Any]]:
    """:func:`holdout_lifts` of the customers who entered a split on UTC days ``since_day`` to
    ``until_day`` (inclusive), converting by the attribution block ``block``: what the dashboard,
    ``GET /v1/attribution/lift`` and ``cadence attribution lift`` show."""
    return holdout_lifts(
        conn,
        since_ms=since_day * DAY_MS,
        until_ms=(until_day + 1) * DAY_MS,
        spec=block.name,
        conversion_event=block.conversion_event,
    )


def _converted_by_days(
    conn: Connection,
    converted: dict[tuple[str, bool], int],
    since_ms: int,
    assigned_until_ms: int,
    until_ms: int,
    conversion_event: str,
) -> None:
    """Add to ``converted`` the customers first assigned in ``[since_ms, assigned_until_ms)`` with a
    ``conversion_event`` from their assignment to ``until_ms``, read from their day buckets."""
    until_day = (until_ms - 1) // DAY_MS
    same_day: list[tuple[str, bool, int, int]] = []  # converted on the assignment's day only: which side?
    for campaign, customer, first_ms, held, last_day in fetch_rows(
        conn, _CONVERTED_BY_DAYS, (conversion_event, until_day, since_ms, assigned_until_ms)
    ):
        if last_day > first_ms // DAY_MS:
            converted[(campaign, bool(held))] = converted.get((campaign, bool(held)), 0) + 1
        else:
            same_day.append((campaign, bool(held), customer, first_ms))
    hits = converted_after(
        conn,
        {(customer, ms) for _c, _h, customer, ms in same_day},
        until_ms=until_ms,
        conversion_event=conversion_event,
    )
    for campaign, held, customer, ms in same_day:
        if (customer, ms) in hits:
            converted[(campaign, held)] = converted.get((campaign, held), 0) + 1


def converted_after(
    conn: Connection, starts: Collection[tuple[int, int]], *, until_ms: int, conversion_event: str
) -> set[tuple[int, int]]:
    """The (customer, start ms) pairs of ``starts`` with a ``conversion_event`` in ``[start, until_ms)``.

    A customer's day buckets (``profile_daily``) answer for the days after the start's
    day; on the start's day itself, the customer's last conversion ever (``profile_event_stats``)
    does when it falls on that day. What is left (a conversion on the start's day, and the
    last one after ``until_ms``) is read from the customer's events.
    """
    if not starts:
        return set()
    customers = sorted({customer for customer, _ms in starts})
    first_day = min(ms for _c, ms in starts) // DAY_MS
    until_day = (until_ms - 1) // DAY_MS
    days: dict[int, list[int]] = {}
    for customer, day in fetch_in(
        conn,
        "SELECT customer_id, day FROM profile_daily WHERE event = ? AND day >= ? AND day <= ? "
        "AND count > 0 AND customer_id IN_VALUES",
        customers,
        conversion_event,
        first_day,
        until_day,
    ):
        days.setdefault(customer, []).append(day)
    if not days:
        return set()
    last = dict(
        fetch_in(
            conn,
            "SELECT customer_id, last_ms FROM profile_event_stats WHERE event = ? AND customer_id IN_VALUES",
            list(days),
            conversion_event,
        )
    )
    out: set[tuple[int, int]] = set()
    for customer, ms in starts:
        bought = days.get(customer)
        if not bought:
            continue
        day = ms // DAY_MS
        if any(day < d for d in bought):  # a later day of the range
            out.add((customer, ms))
        elif day in bought:
            last_ms = last.get(customer, 0)
            if last_ms // DAY_MS == day:
                if ms <= last_ms < until_ms:
                    out.add((customer, ms))
            elif _converted_in(conn, customer, conversion_event, ms, min(until_ms, (day + 1) * DAY_MS)):
                out.add((customer, ms))
    return out


def _converted_in(conn: Connection, customer_id: int, event: str, since_ms: int, until_ms: int) -> bool:
    """Whether the customer's events (every id they go by) hold ``event`` in ``[since_ms, until_ms)``."""
    for kind, value in identities_of(conn, customer_id):
        column = "user_id" if kind == "user" else "anonymous_id"
        found = fetch_rows(
            conn,
            f"SELECT 1 FROM events WHERE {column} = ? AND type = 'track' AND event = ? "  # noqa: S608 (a column name of two)
            "AND ts_ms >= ? AND ts_ms < ? LIMIT 1",
            (value, event, since_ms, until_ms),
        )
        if found:
            return True
    return False
