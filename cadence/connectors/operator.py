"""Operator actions on the send queue's dead letters: list in-doubt sends, re-queue, mark sent.

A send is *in doubt* when a dispatcher died after claiming it and its connector could
not tell whether the provider got it (see
:meth:`cadence.connectors.delivery.Dispatcher.recover_in_doubt`): it is dead-lettered
(``failed``) with ``last_error`` starting ``in_doubt:``. After checking the provider's
own records, an operator either re-queues it (:func:`requeue_sends`; any other dead
letter can be re-queued the same way) or records that it went out (:func:`mark_sent`).
Used by ``cadence sends`` and ``/v1/sends``.

An erased customer's pending removals from ad audiences (``audience_removals``) are listed
by :func:`list_removals` (never with their hashes) and re-queued, once dead-lettered, by
:func:`requeue_removals`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from cadence.connectors.delivery import IN_DOUBT_PREFIX
from cadence.engine.identity import customer_by_ref
from cadence.errors import CadenceError, IdentityError
from cadence.store.db import read_connection
from cadence.store.schema.sends import REMOVAL_STATUSES, audience_removals, sends

__all__ = [
    "ActionResult",
    "list_failed",
    "list_in_doubt",
    "list_removals",
    "list_sends",
    "mark_sent",
    "requeue_removals",
    "requeue_sends",
]

_COLUMNS = (
    sends.c.id,
    sends.c.idempotency_key,
    sends.c.campaign,
    sends.c.customer_id,
    sends.c.channel,
    sends.c.connector,
    sends.c.decision_id,
    sends.c.attempts,
    sends.c.last_error,
    sends.c.updated_ms,
)
#: What :func:`list_sends` shows: the columns above, with the status and due time.
_LIST_COLUMNS = (*_COLUMNS, sends.c.status, sends.c.due_ms)


@dataclass
class ActionResult:
    """Which sends an action changed, and why the others were left alone."""

    done: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"done": [...], "refused": {"id": "reason"}}``."""
        return {"done": self.done, "refused": {str(k): v for k, v in self.refused.items()}}


def list_in_doubt(engine: Engine, *, limit: int = 100, campaign: str | None = None) -> list[dict[str, Any]]:
    """Dead-lettered in-doubt sends, oldest first."""
    return list_failed(engine, error_prefix=IN_DOUBT_PREFIX, limit=limit, campaign=campaign)


def list_failed(
    engine: Engine, *, error_prefix: str, limit: int = 100, campaign: str | None = None
) -> list[dict[str, Any]]:
    """Dead-lettered sends whose ``last_error`` starts with ``error_prefix`` (one cause), oldest first."""
    query = select(*_COLUMNS).where(sends.c.status == "failed", sends.c.last_error.startswith(error_prefix))
    if campaign is not None:
        query = query.where(sends.c.campaign == campaign)
    with read_connection(engine) as conn:
        rows = conn.execute(query.order_by(sends.c.updated_ms, sends.c.id).limit(limit)).mappings()
        return [{str(k): v for k, v in row.items()} for row in rows]


def list_sends(
    engine: Engine,
    *,
    status: str | None = None,
    campaign: str | None = None,
    reason: str | None = None,
    customer: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Sends by status, campaign, customer and ``last_error`` prefix (the reason), latest change first.

    ``reason="quiet:"`` lists the sends the dispatcher held back by quiet hours (deferred:
    ``queued``; dropped: ``suppressed``; ``expired``), ``"cap:"`` and ``"spacing:"`` those held
    by the global caps and spacing (see :mod:`cadence.connectors.dispatch_rules`).

    :param customer: a user id, an anonymous id or a customer number
        (:func:`~cadence.engine.identity.customer_by_ref`); a merged customer's sends are the
        customer's it joined, where the merge moved them.
    :raises IdentityError: when no customer has that id.
    """
    query = select(*_LIST_COLUMNS)
    if status is not None:
        query = query.where(sends.c.status == status)
    if campaign is not None:
        query = query.where(sends.c.campaign == campaign)
    if reason is not None:
        query = query.where(sends.c.last_error.startswith(reason))
    with read_connection(engine) as conn:
        if customer is not None:
            customer_id = customer_by_ref(conn, customer)
            if customer_id is None:
                raise IdentityError(
                    f"customer_id: no customer with user id, anonymous id or customer number {customer!r}"
                )
            query = query.where(sends.c.customer_id == customer_id)
        rows = conn.execute(
            query.order_by(sends.c.updated_ms.desc(), sends.c.id.desc()).limit(limit)
        ).mappings()
        return [{str(k): v for k, v in row.items()} for row in rows]


def _ids(values: Iterable[Any]) -> list[int]:
    ids = []
    for value in values:
        try:
            ids.append(int(value))
        except (TypeError, ValueError) as exc:
            raise CadenceError(f"send id {value!r} is not an integer") from exc
    return ids


def _rows_of(conn: Connection, wanted: list[int]) -> dict[int, Any]:
    """The (id, status, last_error) rows of the sends asked for, by id."""
    query = select(sends.c.id, sends.c.status, sends.c.last_error).where(sends.c.id.in_(wanted))
    return {row.id: row for row in conn.execute(query)}


def requeue_sends(engine: Engine, *, ids: Iterable[Any], now_ms: int) -> ActionResult:
    """Put dead-lettered (``failed``) sends back on the queue, due now, with a fresh attempt count.

    Only ``failed`` rows move: a ``sent`` row is refused (re-queuing it would deliver
    twice), as is one still queued or in flight. The old error is kept in ``last_error``.
    """
    result = ActionResult()
    wanted = _ids(ids)
    with engine.begin() as conn:
        found = _rows_of(conn, wanted)
        for send_id in wanted:
            row = found.get(send_id)
            if row is None:
                result.refused[send_id] = "no such send"
            elif row.status != "failed":
                result.refused[send_id] = f"status is {row.status!r}; only failed sends can be re-queued"
            else:
                conn.execute(
                    update(sends)
                    .where(sends.c.id == send_id, sends.c.status == "failed")
                    .values(
                        status="queued",
                        attempts=0,
                        next_attempt_ms=None,
                        due_ms=now_ms,
                        last_error=f"re-queued by an operator; was: {(row.last_error or '')[:1000]}",
                        updated_ms=now_ms,
                    )
                )
                result.done.append(send_id)
    return result


def mark_sent(
    engine: Engine, *, ids: Iterable[Any], now_ms: int, provider_message_id: str | None = None
) -> ActionResult:
    """Record in-doubt sends the provider turned out to have as ``sent`` (nothing is sent again)."""
    result = ActionResult()
    wanted = _ids(ids)
    with engine.begin() as conn:
        found = _rows_of(conn, wanted)
        for send_id in wanted:
            row = found.get(send_id)
            if row is None:
                result.refused[send_id] = "no such send"
            elif row.status != "failed" or not (row.last_error or "").startswith(IN_DOUBT_PREFIX):
                result.refused[send_id] = "not an in-doubt send"
            else:
                values: dict[str, Any] = {"status": "sent", "last_error": None, "updated_ms": now_ms}
                if provider_message_id:
                    values["provider_message_id"] = provider_message_id
                conn.execute(update(sends).where(sends.c.id == send_id).values(**values))
                result.done.append(send_id)
    return result


#: What :func:`list_removals` shows of a removal: everything but the hashed identifiers.
_REMOVAL_COLUMNS = tuple(c for c in audience_removals.c if c.name != "identifiers")


def list_removals(engine: Engine, *, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Erased customers' pending removals from ad audiences, oldest first, without their hashes.

    ``status``: ``queued`` (waiting for the dispatcher or a retry), ``sending`` (in flight) or
    ``failed`` (dead-lettered with the platform's error: :func:`requeue_removals` once fixed).
    A removal the platform accepted is deleted, so an empty list means every one went out.
    """
    if status is not None and status not in REMOVAL_STATUSES:
        raise CadenceError(f"removal status {status!r} is not one of {', '.join(REMOVAL_STATUSES)}")
    query = select(*_REMOVAL_COLUMNS)
    if status is not None:
        query = query.where(audience_removals.c.status == status)
    with read_connection(engine) as conn:
        rows = conn.execute(query.order_by(audience_removals.c.id).limit(limit)).mappings()
        return [{str(k): v for k, v in row.items()} for row in rows]


def requeue_removals(engine: Engine, *, ids: Iterable[Any], now_ms: int) -> ActionResult:
    """Put dead-lettered (``failed``) audience removals back on the queue, due now, attempts reset."""
    result = ActionResult()
    wanted = _ids(ids)
    with engine.begin() as conn:
        found = {
            row.id: row
            for row in conn.execute(
                select(
                    audience_removals.c.id, audience_removals.c.status, audience_removals.c.last_error
                ).where(audience_removals.c.id.in_(wanted))
            )
        }
        for removal_id in wanted:
            row = found.get(removal_id)
            if row is None:
                result.refused[removal_id] = "no such removal (one the platform accepted is deleted)"
            elif row.status != "failed":
                result.refused[removal_id] = (
                    f"status is {row.status!r}; only failed removals can be re-queued"
                )
            else:
                conn.execute(
                    update(audience_removals)
                    .where(audience_removals.c.id == removal_id, audience_removals.c.status == "failed")
                    .values(
                        status="queued",
                        attempts=0,
                        next_attempt_ms=None,
                        last_error=f"re-queued by an operator; was: {(row.last_error or '')[:1000]}",
                        updated_ms=now_ms,
                    )
                )
                result.done.append(removal_id)
    return result
