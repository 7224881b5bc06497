"""Data-subject requests: export everything about a customer, or erase it.

Erasure removes the customer's events from the log, their identities, traits,
profiles, consent rows, sends, decisions, dry-run outbox messages and ad-audience
memberships, and lets every engine-loop subscriber correct the derived state that counted
them, all in one transaction. It is recorded in
``erasures`` with counts and the operator's name, never with the erased ids.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine, delete, func, insert, or_, select, text

from cadence.clock import now_ms
from cadence.engine.consent import consent_of
from cadence.engine.identity import identities_of, resolve_customer
from cadence.engine.loop import BATCH_LOCK_ID, EngineLoop
from cadence.engine.profiles import load_profile
from cadence.errors import IdentityError
from cadence.runtime import Runtime
from cadence.store.db import read_connection
from cadence.store.schema.connectors import outbox
from cadence.store.schema.core import customers, erasures, events, identities
from cadence.store.schema.scheduler import audience_members
from cadence.store.schema.sends import sends

log = logging.getLogger("cadence.privacy")

__all__ = ["erase_customer", "export_customer"]


def _members(conn: Any, customer_id: int) -> list[int]:
    members, frontier = [customer_id], [customer_id]
    while frontier:
        frontier = [
            c
            for c in conn.scalars(select(customers.c.id).where(customers.c.merged_into.in_(frontier)))
            if c not in members
        ]
        members.extend(frontier)
    return members


def _event_filter(ids: list[tuple[str, str]]) -> Any:
    users = [v for k, v in ids if k == "user"]
    anons = [v for k, v in ids if k == "anonymous"]
    return or_(events.c.user_id.in_(users), events.c.anonymous_id.in_(anons))


def export_customer(*, engine: Engine, ref: str, now: int | None = None) -> dict[str, Any]:
    """Everything cadence holds about the customer behind ``ref`` (a user or anonymous id).

    Raises :class:`IdentityError` when no customer has that id.
    """
    now = now or now_ms()
    with read_connection(engine) as conn:
        cid = resolve_customer(conn, ref)
        if cid is None:
            raise IdentityError(f"no customer with user or anonymous id {ref!r}")
        ids = identities_of(conn, cid)
        profile = load_profile(conn, cid, now_ms=now)
        rows = conn.execute(
            select(
                events.c.id,
                events.c.message_id,
                events.c.type,
                events.c.event,
                events.c.user_id,
                events.c.anonymous_id,
                events.c.ts_ms,
                events.c.source,
                events.c.payload,
            )
            .where(_event_filter(ids))
            .order_by(events.c.id)
        ).all()
        queued = conn.execute(
            select(
                sends.c.campaign, sends.c.channel, sends.c.status, sends.c.due_ms, sends.c.decision_id
            ).where(sends.c.customer_id.in_(_members(conn, cid)))
        ).all()
        return {
            "customer_id": cid,
            "identities": [{"kind": k, "value": v} for k, v in ids],
            "traits": dict(profile.traits),
            "timezone": profile.timezone,
            "first_seen_ms": profile.first_seen_ms,
            "last_seen_ms": profile.last_seen_ms,
            "consent": consent_of(conn, cid),
            "aggregates": {
                name: {"count": s[0], "sum_value": s[1], "first_ms": s[2], "last_ms": s[3]}
                for name, s in sorted(profile.stats.items())
            },
            # str(): a column named like a keyword ("type") is a quoted_name, which orjson refuses as a key
            "events": [{str(k): v for k, v in r._mapping.items()} for r in rows],
            "sends": [{str(k): v for k, v in r._mapping.items()} for r in queued],
        }


def erase_customer(
    *, runtime: Runtime, ref: str, requested_by: str, loop: EngineLoop | None = None
) -> dict[str, int]:
    """Erase the customer behind ``ref`` and everything derived from their events.

    ``loop`` is the engine loop whose subscribers must correct their state; without
    one, a loop with the standard subscribers is built. Returns the counts recorded.
    """
    loop = loop or EngineLoop(runtime)
    # The loop's lock first, then the batch lock, in the order a batch takes them.
    with loop.held(), runtime.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Serialise with the loop's batches (SQLite's BEGIN IMMEDIATE already does): a batch
            # committing a profile row for this customer meanwhile would outlive the erasure.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": BATCH_LOCK_ID})
        cid = resolve_customer(conn, ref)
        if cid is None:
            raise IdentityError(f"no customer with user or anonymous id {ref!r}")
        members = _members(conn, cid)
        # Before the rows go: SQLite's next customer ids start after it (identity._reserve_customer_ids).
        ids_to = max(
            int(conn.scalar(select(func.max(customers.c.id))) or 0),
            int(conn.scalar(select(erasures.c.customer_ids_to).order_by(erasures.c.id.desc()).limit(1)) or 0),
        )
        ids = identities_of(conn, cid)
        loop.erase(conn, members)
        removed = conn.execute(delete(events).where(_event_filter(ids))).rowcount
        n_ids = conn.execute(delete(identities).where(identities.c.customer_id.in_(members))).rowcount
        # Tables keyed by customer without a cascading key: the dry-run outbox's messages (addresses,
        # rendered variables) and the ad audiences the customer was synced to.
        conn.execute(delete(outbox).where(outbox.c.customer_id.in_(members)))
        audiences = sorted(
            conn.execute(
                delete(audience_members)
                .where(audience_members.c.customer_id.in_(members))
                .returning(audience_members.c.campaign)
            ).scalars()
        )
        if audiences:
            log.warning(
                "the erased customer was in the ad audiences of %s: cadence cannot remove them there"
                " without the identifiers it just erased; remove them with the platform's own tools",
                ", ".join(audiences),
            )
        conn.execute(customers.update().where(customers.c.id.in_(members)).values(merged_into=None))
        conn.execute(delete(customers).where(customers.c.id.in_(members)))
        counts = {"events_removed": int(removed), "identities_removed": int(n_ids)}
        conn.execute(
            insert(erasures).values(
                requested_ms=now_ms(), requested_by=requested_by, customer_ids_to=ids_to, **counts
            )
        )
    return counts
