"""Consent per customer and channel: who may be sent what.

Consent is derived from the event log like every other state (identify traits,
``Consent Updated`` events from ``POST /v1/consent``, unsubscribe and spam-report
feedback), and each row keeps its source, time and the event that set it. Readers
(decisions, the dispatcher) call :func:`may_send`.

Traits that set consent on ``identify``: ``consent: {"email": true, "sms": false}``
(or a list of granted channels), and Segment-style ``unsubscribed: true`` (all channels).
"""

from __future__ import annotations

from sqlalchemy import Connection, select

from cadence.store.schema.core import consent

__all__ = ["consent_of", "may_send"]


def consent_of(conn: Connection, customer_id: int) -> dict[str, dict[str, object]]:
    """Every channel's consent for a customer: ``{channel: {granted, source, changed_ms}}``."""
    rows = conn.execute(
        select(consent.c.channel, consent.c.granted, consent.c.source, consent.c.changed_ms).where(
            consent.c.customer_id == customer_id
        )
    )
    return {
        channel: {"granted": granted, "source": source, "changed_ms": changed_ms}
        for channel, granted, source, changed_ms in rows
    }


def may_send(conn: Connection, customer_id: int, channel: str, *, require_opt_in: bool = False) -> bool:
    """False when the customer opted out of ``channel`` (or of ``all``).

    With ``require_opt_in`` (channels that need explicit consent, such as SMS in
    many countries) an unknown consent is a no as well.
    """
    rows = dict(
        conn.execute(
            select(consent.c.channel, consent.c.granted).where(
                consent.c.customer_id == customer_id, consent.c.channel.in_([channel, "all"])
            )
        ).all()
    )
    if rows.get("all") is False or rows.get(channel) is False:
        return False
    if require_opt_in:
        return rows.get(channel) is True
    return True
