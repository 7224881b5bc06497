"""Putting sends on the queue, idempotently. Taking them off is the dispatcher's job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import Connection, case

from cadence.channels import Feedback
from cadence.clock import now_ms as wall_ms
from cadence.store.fast import dialect_insert, dialect_sql
from cadence.store.schema.sends import sends

#: Feedback that says the message reached the customer. When it names a decision whose send
#: cadence has not sent (:data:`UNSENT`), the message went out some other way (the app delivered
#: it itself, or a simulation or replay with ``at`` ran ahead of, or behind, the dispatcher's wall
#: clock): the send is settled ``sent`` rather than sent again or suppressed by the opt-out its own
#: feedback caused.
REACHED = frozenset(
    {
        Feedback.SENT,
        Feedback.DELIVERED,
        Feedback.OPENED,
        Feedback.CLICKED,
        Feedback.CONVERTED,
        Feedback.UNSUBSCRIBED,
        Feedback.SPAM_REPORT,
    }
)

#: The statuses of a send cadence has not sent: still ``queued``, or held back by the dispatcher's
#: checks at its own clock (``suppressed``: quiet hours ``then drop``, a cap, no consent by then;
#: ``expired``). Its own feedback saying the message reached the customer settles it.
UNSENT = ("queued", "suppressed", "expired")

__all__ = [
    "ENQUEUE_SENDS_SQL",
    "enqueue_params",
    "enqueue_prepared",
    "enqueue_send",
    "enqueue_sends",
    "is_replay",
    "REPLAY_MS",
    "idempotency_key",
    "REACHED",
    "UNSENT",
    "settle_reached",
]

#: What :func:`enqueue_sends` runs per row (``?`` placeholders, ``?::json`` a JSON parameter: see
#: :func:`~cadence.store.fast.dialect_sql`), for a caller that writes on a DBAPI connection itself.
ENQUEUE_SENDS_SQL = (
    "INSERT INTO sends (idempotency_key, decision_id, campaign, customer_id, channel, connector, template,"
    " variables, due_ms, status, attempts, created_ms, updated_ms, queued_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?::json, ?, 'queued', 0, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING"
)

#: A send decided as of a time more than this before it was queued (``created_ms``, the deciding
#: clock, against ``queued_ms``, the wall clock) was decided in the past: ``at`` in a simulation or
#: replay. The dispatcher does not judge such a send's quiet hours, caps and spacing again by its
#: own clock: the decision placed it in its own timeline, where it cannot be late, and a real
#: night in the customer's zone deferred it out of the simulated days (or dropped it), so the
#: decisions after it no longer counted it. An hour: a push's chunks, decided at the run's start,
#: are queued within minutes of it.
REPLAY_MS = 3_600_000


def is_replay(created_ms: int, queued_ms: int | None) -> bool:
    """Whether a send was decided as of a time well before it was queued (see :data:`REPLAY_MS`).

    >>> is_replay(1_000, 1_000 + REPLAY_MS + 1), is_replay(1_000, 2_000), is_replay(1_000, None)
    (True, False, False)
    """
    return queued_ms is not None and created_ms < queued_ms - REPLAY_MS


def idempotency_key(campaign: str, customer_id: int, occurrence: str) -> str:
    """The key that makes a send unique: campaign, customer and occurrence.

    The occurrence names which firing this is: the scheduled run's date, the
    triggering event's id, or the decision id for a one-off API decision.

    >>> idempotency_key("winback", 42, "2026-03-05")
    'winback:42:2026-03-05'
    """
    return f"{campaign}:{customer_id}:{occurrence}"


def enqueue_send(
    conn: Connection,
    *,
    key: str,
    campaign: str,
    customer_id: int,
    channel: str,
    due_ms: int,
    now_ms: int,
    template: str | None = None,
    variables: dict[str, Any] | None = None,
    decision_id: str | None = None,
    connector: str | None = None,
    queued_ms: int | None = None,
) -> bool:
    """Queue a send inside the caller's transaction; False if ``key`` was already queued.

    ``now_ms`` is the deciding clock's time; ``queued_ms`` the dispatcher's (the wall clock when
    None): see :func:`is_replay`.
    """
    result = conn.execute(
        dialect_insert(conn, sends)
        .values(
            idempotency_key=key,
            decision_id=decision_id,
            campaign=campaign,
            customer_id=customer_id,
            channel=channel,
            connector=connector,
            template=template,
            variables=variables or {},
            due_ms=due_ms,
            status="queued",
            attempts=0,
            created_ms=now_ms,
            updated_ms=now_ms,
            queued_ms=wall_ms() if queued_ms is None else queued_ms,
        )
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
    )
    return bool(result.rowcount)


def enqueue_sends(
    conn: Connection, rows: Sequence[Mapping[str, Any]], *, now_ms: int, queued_ms: int | None = None
) -> int:
    """Queue many sends in one driver-level statement (audience pushes); returns how many were new.

    Each row has the keyword arguments of :func:`enqueue_send` but ``now_ms``
    (``key``, ``campaign``, ``customer_id``, ``channel``, ``due_ms``, optional
    ``template``, ``variables``, ``decision_id``, ``connector``). A key already
    queued is skipped, exactly as with :func:`enqueue_send`.
    """
    if not rows:
        return 0
    return enqueue_prepared(conn, enqueue_params(rows, now_ms=now_ms, queued_ms=queued_ms))


def enqueue_prepared(conn: Connection, params: Sequence[tuple[Any, ...]]) -> int:
    """:func:`enqueue_sends` with its parameters built already (:func:`enqueue_params`); how many were new."""
    if not params:
        return 0
    result = conn.exec_driver_sql(dialect_sql(conn, ENQUEUE_SENDS_SQL), list(params))
    return max(int(result.rowcount), 0)


def enqueue_params(
    rows: Sequence[Mapping[str, Any]], *, now_ms: int, queued_ms: int | None = None
) -> list[tuple[Any, ...]]:
    """The parameters of :data:`ENQUEUE_SENDS_SQL` for each row (rows as :func:`enqueue_sends` takes them).

    >>> row = {"key": "k", "campaign": "c", "customer_id": 1, "channel": "email", "due_ms": 5}
    >>> enqueue_params([row], now_ms=2)[0][:-1], enqueue_params([row], now_ms=2)[0][-1] > 2
    (('k', None, 'c', 1, 'email', None, None, '{}', 5, 2, 2), True)
    """
    queued = wall_ms() if queued_ms is None else queued_ms
    return [
        (
            row["key"],
            row.get("decision_id"),
            row["campaign"],
            row["customer_id"],
            row["channel"],
            row.get("connector"),
            row.get("template"),
            orjson.dumps(row.get("variables") or {}).decode(),
            row["due_ms"],
            now_ms,
            now_ms,
            queued,
        )
        for row in rows
    ]


def settle_reached(conn: Connection, decision_id: str, *, event: str, ts_ms: int) -> int:
    """Mark the decision's unsent send (:data:`UNSENT`) as ``sent``: its feedback (``event``) says it reached the customer.

    Such a send counts for caps and spacing as one the dispatcher sent would, from when it reached
    the customer: its due time, or the feedback's time ``ts_ms`` when that is earlier. A decision
    with ``at`` in the past queues a send the dispatcher judges at its own wall clock, which can
    defer it to that clock's next morning (moving the due time out of the simulated days) or drop
    it; counted there, or not at all, it let the next decisions of the simulated day break a cap.
    It is not delivered a second time. The row says why in ``last_error``. Returns the number of
    rows settled (0 when the dispatcher already sent it).
    """
    return conn.execute(
        sends.update()
        .where(sends.c.decision_id == decision_id, sends.c.status.in_(UNSENT))
        .values(
            status="sent",
            due_ms=case((sends.c.due_ms > ts_ms, ts_ms), else_=sends.c.due_ms),
            updated_ms=ts_ms,
            last_error=f"settled: {event} arrived before cadence sent it (delivered elsewhere); not sent again",
        )
    ).rowcount
