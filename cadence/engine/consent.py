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

from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, delete, select

from cadence.channels import (
    CONSENT_EVENT,
    Feedback,
    channel_named,
    feedback_channel,
    feedback_kind,
)
from cadence.engine.events import LoggedEvent
from cadence.store.fast import (
    array_literal,
    execute_in,
    execute_many,
    fetch_in,
    index_scans,
    is_postgres,
    send,
    write_rows,
)
from cadence.store.schema.core import consent

__all__ = [
    "CONSENT_EVENT",
    "ConsentSubscriber",
    "consent_allows",
    "consent_changes",
    "consent_of",
    "hard_bounce",
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


BOUNCE = "bounce:"  # the source prefix of a bounce, a refusal by the address, not the customer


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

    Channel names in another case are the channels they spell; values of the wrong type change
    nothing (:func:`~cadence.channels.consent_warnings` names them to the sender), never a channel named ``"5"``:

    >>> consent_changes(E(4, "m4", "identify", None, "u", None, 1, 0, "api",
    ...     {"traits": {"consent": ["Email", 5, ["sms"]], "unsubscribed": "true"}}))
    [('email', True, 'identify')]
    >>> consent_changes(E(5, "m5", "track", "Consent Updated", "u", None, 1, 0, "api",
    ...     {"properties": {"channel": ["sms"], "granted": False, "channels": {"SMS": False}, "source": 7}}))
    [('sms', False, 'api')]
    """
    changes: list[tuple[str, bool | None, str]] = []
    if event.type == "identify":
        traits = event.traits
        granted = traits.get("consent")
        if isinstance(granted, dict):
            changes += [
                (channel_named(ch), v, "identify") for ch, v in granted.items() if ch and isinstance(v, bool)
            ]
        elif isinstance(granted, list):
            changes += [(channel_named(ch), True, "identify") for ch in granted if isinstance(ch, str) and ch]
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
        source = props.get("source")
        source = source if isinstance(source, str) and source else event.source
        # ``channels`` (POST /v1/consent) and ``consent`` (cadence.js, as in identify traits)
        for key in ("channels", "consent"):
            if isinstance(props.get(key), dict):
                changes += [
                    (channel_named(ch), v, source)
                    for ch, v in props[key].items()
                    if ch and isinstance(v, bool)
                ]
        channel = props.get("channel")
        if isinstance(channel, str) and channel and isinstance(props.get("granted"), bool):
            changes.append((channel_named(channel), props["granted"], source))
        return changes
    kind = feedback_kind(event.event)
    if kind in (Feedback.UNSUBSCRIBED, Feedback.SPAM_REPORT):
        channel = feedback_channel(event.event, props) or "all"
        changes.append((channel, False, f"{kind.value}:{event.source}"))
    elif kind is Feedback.BOUNCED and hard_bounce(props.get("bounce_type")):
        channel = feedback_channel(event.event, props) or "email"
        changes.append((channel, False, f"{BOUNCE}{event.source}"))
    return changes


def hard_bounce(bounce_type: object) -> bool:
    """Whether a bounce with this ``properties.bounce_type`` marks the address undeliverable.

    Only ``"soft"`` (in any case) does not. Absent, another word, or not a string at all, it
    is read as hard, as a bounce without one always was (:func:`~cadence.channels.consent_warnings` names the
    unreadable ones to the sender): ``["soft"]`` is not a soft bounce's type.

    >>> hard_bounce(None), hard_bounce("hard"), hard_bounce("Soft"), hard_bounce(["soft"])
    (True, True, False, True)
    """
    return not (isinstance(bounce_type, str) and bounce_type.strip().lower() == "soft")


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
        clears: dict[tuple[int, str], int] = {}  # (customer, channel) -> new address event id
        for e in batch:
            kind = e.type
            if kind == "track":
                # Most tracks say nothing about consent: decided by name alone (cached per name).
                if not _track_may_change_consent(e.event):
                    continue
            elif kind != "identify":
                continue
            for channel, granted, source in consent_changes(e):
                if channel.endswith(":bounce"):
                    base = channel.split(":", 1)[0]
                    prior = latest.get((e.customer_id, base))
                    if prior is None or prior[1].startswith("bounce:"):
                        clears[(e.customer_id, base)] = e.id
                    continue
                key = (e.customer_id, channel)
                if source.startswith(BOUNCE) and _keeps_refusal(latest.get(key)):
                    continue
                latest[key] = (granted, source, e.ts_ms, e.id)
        _upsert_many(
            conn,
            [
                (cid, channel, bool(granted), source, ts_ms, eid)
                for (cid, channel), (granted, source, ts_ms, eid) in latest.items()
            ],
        )
        if not clears:
            return
        # A new address lifts a bounce recorded before it (in this batch or earlier).
        if is_postgres(conn):
            # One statement, nothing read back: in the engine loop's pipeline a read waits for every
            # write sent before it (this batch's profiles), and the loop with it (measured).
            keys = sorted(clears)
            customer_ids = array_literal("bigint", [cid for cid, _ch in keys])
            with index_scans(conn):  # the table may have outgrown its statistics
                send(
                    conn,
                    "DELETE FROM consent USING unnest(%s::bigint[], %s::text[], %s::bigint[]) AS c(cid, ch, eid)"
                    " WHERE consent.customer_id = c.cid AND consent.channel = c.ch"
                    " AND substr(consent.source, 1, 7) = 'bounce:' AND consent.event_id < c.eid"
                    # ``= ANY``: without it the planner may join by scanning the whole table (see identity)
                    " AND consent.customer_id = ANY(%s::bigint[])",
                    (
                        customer_ids,
                        array_literal("text", [ch for _cid, ch in keys]),
                        array_literal("bigint", [clears[key] for key in keys]),
                        customer_ids,
                    ),
                )
            return
        bounced = fetch_in(
            conn,
            "SELECT customer_id, channel, event_id FROM consent "
            "WHERE source LIKE ? AND customer_id IN_VALUES",
            {cid for cid, _channel in clears},
            "bounce:%",
        )
        execute_many(
            conn,
            "DELETE FROM consent WHERE customer_id = ? AND channel = ?",
            [(cid, ch) for cid, ch, eid in bounced if eid < clears.get((cid, ch), -1)],
        )

    def merged(self, conn: Connection, winner: int, loser: int) -> None:
        self.merged_many(conn, [(winner, loser)])

    def merged_many(self, conn: Connection, merges: Sequence[tuple[int, int]]) -> None:
        """Move every loser's rows to its winner; per channel the latest event's row stays."""
        if not merges:
            return
        order = {loser: i for i, (_w, loser) in enumerate(merges)}
        winner_of = {loser: winner for winner, loser in merges}
        with index_scans(conn):  # the table may have outgrown its statistics
            rows = fetch_in(
                conn,
                "SELECT customer_id, channel, granted, source, changed_ms, event_id FROM consent "
                "WHERE customer_id IN_VALUES",
                order,
            )
            execute_in(conn, "DELETE FROM consent WHERE customer_id IN_VALUES", order)
        moved: dict[tuple[int, str], tuple[Any, ...]] = {}
        for cid, channel, granted, source, changed_ms, eid in sorted(rows, key=lambda r: order[r[0]]):
            key = (winner_of[cid], channel)
            row = (key[0], channel, bool(granted), source, changed_ms, eid)
            if key not in moved or _replaces(row, moved[key]):
                moved[key] = row
        _upsert_many(conn, list(moved.values()))

    def erased(self, conn: Connection, customer_id: int) -> None:
        conn.execute(delete(consent).where(consent.c.customer_id == customer_id))


def undeliverable(rows: Iterable[tuple[str, Any, Any]]) -> frozenset[str]:
    """The channels of consent rows ``(channel, granted, source)`` that a bounce refused: the
    address, not the customer (decisions say "address bounced" for them, not "opted out").

    >>> sorted(undeliverable([("email", False, "bounce:webhook:sendgrid"), ("sms", False, "api"), ("push", True, "x")]))
    ['email']
    """
    return frozenset(ch for ch, granted, source in rows if not granted and str(source).startswith(BOUNCE))


def _keeps_refusal(held: tuple[bool | None, str, int, int] | None) -> bool:
    """Whether ``held`` (granted, source, ...) is a customer's refusal, which a bounce never replaces.

    A bounce and an unsubscribe share the channel's one row; were the bounce to replace
    the refusal, the next address would lift the bounce and, with it, the opt-out.
    """
    return held is not None and held[0] is False and not held[1].startswith(BOUNCE)


def _replaces(row: tuple[Any, ...], held: tuple[Any, ...]) -> bool:
    """Whether consent ``row`` replaces ``held`` for the same customer and channel on a merge.

    (customer, channel, granted, source, changed_ms, event_id) rows: the later event wins,
    except that between a bounce and a customer's refusal the refusal stays, whichever
    came first (one by one, the bounce would not have replaced it either).

    >>> unsub = (1, "email", False, "unsubscribed:api", 0, 5)
    >>> bounce = (1, "email", False, "bounce:api", 0, 9)
    >>> _replaces(bounce, unsub), _replaces(unsub, bounce)
    (False, True)
    >>> _replaces((1, "email", True, "identify", 0, 12), bounce)
    True
    """
    row_bounce, held_bounce = row[3].startswith(BOUNCE), held[3].startswith(BOUNCE)
    if row_bounce and not held_bounce and held[2] is False:
        return False
    if held_bounce and not row_bounce and row[2] is False:
        return True
    return bool(held[5] < row[5])


@lru_cache(maxsize=4096)
def _track_may_change_consent(name: str | None) -> bool:
    """Whether :func:`consent_changes` can find anything in a track event of this name.

    >>> _track_may_change_consent("Email Bounced"), _track_may_change_consent("Order Completed")
    (True, False)
    """
    return name == CONSENT_EVENT or feedback_kind(name) in (
        Feedback.UNSUBSCRIBED,
        Feedback.SPAM_REPORT,
        Feedback.BOUNCED,
    )


_CONSENT_COLUMNS = (
    ("customer_id", "bigint"),
    ("channel", "text"),
    ("granted", "boolean"),
    ("source", "text"),
    ("changed_ms", "bigint"),
    ("event_id", "bigint"),
)


def _upsert_many(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Write (customer, channel, granted, source, ts_ms, event_id) rows (unique keys), each
    unless a later event already set its channel (as :func:`_replaces` decides)."""
    write_rows(
        conn,
        "consent",
        _CONSENT_COLUMNS,
        rows,
        "ON CONFLICT (customer_id, channel) DO UPDATE SET granted = excluded.granted,"
        " source = excluded.source, changed_ms = excluded.changed_ms, event_id = excluded.event_id"
        " WHERE (consent.event_id < excluded.event_id"
        # a bounce never replaces a customer's refusal (see _keeps_refusal)
        # (substr, not LIKE: a % would be a parameter mark to psycopg)
        " AND NOT (substr(excluded.source, 1, 7) = 'bounce:' AND NOT consent.granted"
        " AND substr(consent.source, 1, 7) <> 'bounce:'))"
        # and a refusal replaces a bounce even when older: a merge folds in a loser's refusal made
        # before the winner's bounce, which would not have replaced it in one customer (_replaces)
        " OR (substr(consent.source, 1, 7) = 'bounce:' AND substr(excluded.source, 1, 7) <> 'bounce:'"
        " AND NOT excluded.granted)",
    )
