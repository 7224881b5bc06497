"""Consent per customer and channel: who may be sent what.

Consent is derived from the event log like every other state (identify traits,
``Consent Updated`` events from ``POST /v1/consent``, unsubscribe and spam-report
feedback), and each row keeps its source, time and the event that set it. Readers
(decisions, the dispatcher) call :func:`may_send`.

Traits that set consent on ``identify``: ``consent: {"email": true, "sms": false}``
(or a list of granted channels), and Segment-style ``unsubscribed: true`` (all channels).
A ``track`` event named ``Consent Updated`` with ``properties.channels: {"sms": true}``
(or ``properties.consent``, or ``channel`` and ``granted``) sets it explicitly;
``POST /v1/consent`` and the browser tracker's ``optOut()``/``consent()`` send one.
``Unsubscribed`` and ``Spam Reported`` feedback (``properties.channel``, or ``all``)
refuse it; a hard ``... Bounced`` marks the channel undeliverable until a new address.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, delete, select

from cadence.channels import IMPLIED_CHANNEL, Feedback, feedback_kind
from cadence.engine.events import LoggedEvent
from cadence.store.fast import dialect_insert
from cadence.store.schema.core import consent

__all__ = [
    "CONSENT_EVENT",
    "ConsentSubscriber",
    "consent_allows",
    "consent_changes",
    "consent_of",
    "may_send",
]


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
    return consent_allows(rows, channel, require_opt_in=require_opt_in)


def consent_allows(rows: Mapping[str, bool], channel: str, *, require_opt_in: bool = False) -> bool:
    """:func:`may_send` over a customer's consent rows already read (``{channel: granted}``).

    >>> consent_allows({"all": False}, "email"), consent_allows({}, "sms", require_opt_in=True)
    (False, False)
    >>> consent_allows({"email": True}, "email"), consent_allows({}, "email")
    (True, True)
    """
    if rows.get("all") is False or rows.get(channel) is False:
        return False
    if require_opt_in:
        return rows.get(channel) is True
    return True


CONSENT_EVENT = "Consent Updated"


def consent_changes(event: LoggedEvent) -> list[tuple[str, bool | None, str]]:
    """What an event says about consent: ``(channel, granted, source)`` triples.

    ``granted=None`` clears a row (a new address resets an earlier bounce).

    >>> from cadence.engine.events import LoggedEvent as E
    >>> consent_changes(E(1, "m", "identify", None, "u", None, 1, 0, "api",
    ...     {"traits": {"consent": {"email": True, "sms": False}}}))
    [('email', True, 'identify'), ('sms', False, 'identify')]
    >>> consent_changes(E(2, "m2", "track", "Consent Updated", "u", None, 1, 0, "api",
    ...     {"properties": {"consent": {"all": False}, "source": "cadence.js"}}))
    [('all', False, 'cadence.js')]
    >>> consent_changes(E(3, "m3", "track", "Email Bounced", "u", None, 1, 0, "webhook:sendgrid", {}))
    [('email', False, 'bounce:webhook:sendgrid')]
    """
    changes: list[tuple[str, bool | None, str]] = []
    if event.type == "identify":
        traits = event.traits
        granted = traits.get("consent")
        if isinstance(granted, dict):
            changes += [(str(ch), bool(v), "identify") for ch, v in granted.items() if isinstance(v, bool)]
        elif isinstance(granted, list):
            changes += [(str(ch), True, "identify") for ch in granted]
        if traits.get("unsubscribed") is True:
            changes.append(("all", False, "identify"))
        elif traits.get("unsubscribed") is False:
            changes.append(("all", True, "identify"))
        if traits.get("email"):
            changes.append(("email:bounce", None, "identify"))
        if traits.get("phone"):
            changes.append(("sms:bounce", None, "identify"))
        return changes
    if event.type != "track":
        return changes
    props = event.properties
    if event.event == CONSENT_EVENT:
        source = str(props.get("source") or event.source)
        # ``channels`` (POST /v1/consent) and ``consent`` (cadence.js, as in identify traits)
        for key in ("channels", "consent"):
            if isinstance(props.get(key), dict):
                changes += [(str(ch), v, source) for ch, v in props[key].items() if isinstance(v, bool)]
        if props.get("channel") and isinstance(props.get("granted"), bool):
            changes.append((str(props["channel"]), props["granted"], source))
        return changes
    kind = feedback_kind(event.event)
    if kind in (Feedback.UNSUBSCRIBED, Feedback.SPAM_REPORT):
        channel = props.get("channel") or IMPLIED_CHANNEL.get(event.event or "") or "all"
        changes.append((str(channel), False, f"{kind.value}:{event.source}"))
    elif kind is Feedback.BOUNCED and props.get("bounce_type", "hard") != "soft":
        channel = props.get("channel") or IMPLIED_CHANNEL.get(event.event or "") or "email"
        changes.append((str(channel), False, f"bounce:{event.source}"))
    return changes


class ConsentSubscriber:
    """Keeps the ``consent`` table from identify traits, consent events and feedback.

    A hard bounce is kept as a refusal with source ``bounce:...``; a later identify
    carrying a new address clears it.
    """

    name = "consent"

    def __init__(self, runtime: Any = None) -> None:
        self.runtime = runtime

    def start(self, conn: Connection, checkpoint: int) -> int:
        return checkpoint

    def apply(self, conn: Connection, batch: Sequence[LoggedEvent]) -> None:
        latest: dict[tuple[int, str], tuple[bool | None, str, int, int]] = {}
        for e in batch:
            for channel, granted, source in consent_changes(e):
                if channel.endswith(":bounce"):
                    base = channel.split(":", 1)[0]
                    prior = latest.get((e.customer_id, base))
                    if prior is None or prior[1].startswith("bounce:"):
                        latest[(e.customer_id, f"{base}:clear-bounce")] = (None, source, e.ts_ms, e.id)
                    continue
                latest[(e.customer_id, channel)] = (granted, source, e.ts_ms, e.id)
        for (cid, channel), (granted, source, ts_ms, eid) in latest.items():
            if channel.endswith(":clear-bounce"):
                base = channel.split(":", 1)[0]
                conn.execute(
                    delete(consent).where(
                        consent.c.customer_id == cid,
                        consent.c.channel == base,
                        consent.c.source.like("bounce:%"),
                        consent.c.event_id < eid,
                    )
                )
                continue
            _upsert(conn, cid, channel, bool(granted), source, ts_ms, eid)

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        rows = conn.execute(select(consent).where(consent.c.customer_id == loser)).all()
        conn.execute(delete(consent).where(consent.c.customer_id == loser))
        for r in rows:
            _upsert(conn, winner, r.channel, r.granted, r.source, r.changed_ms, r.event_id)

    def erased(self, conn: Connection, customer_id: int) -> None:
        conn.execute(delete(consent).where(consent.c.customer_id == customer_id))


def _upsert(
    conn: Connection, cid: int, channel: str, granted: bool, source: str, ts_ms: int, eid: int
) -> None:
    """Write a consent row unless a later event already set this channel."""
    stmt = dialect_insert(conn, consent).values(
        customer_id=cid, channel=channel, granted=granted, source=source, changed_ms=ts_ms, event_id=eid
    )
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["customer_id", "channel"],
            set_={k: stmt.excluded[k] for k in ("granted", "source", "changed_ms", "event_id")},
            where=consent.c.event_id < stmt.excluded.event_id,
        )
    )
