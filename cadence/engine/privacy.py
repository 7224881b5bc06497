"""Data-subject requests: export everything about a customer, or erase it.

Erasure removes the customer's events from the log, their identities, traits,
profiles, consent rows, sends, decisions, dry-run outbox messages and ad-audience
memberships, and lets every engine-loop subscriber correct the derived state that counted
them, all in one transaction. It is recorded in
``erasures`` with counts and the operator's name, never with the erased ids.

The ad platforms cadence synced the customer to (Meta Custom Audiences, Google Ads
Customer Match) are processors of the same data: in the same transaction, before the
customer's rows go, every audience they (or a customer merged into them) may be in gets
a pending removal in ``audience_removals``, holding only the identifiers the audience's
connector hashes (:meth:`~cadence.connectors.base.Connector.audience_identifiers`), the
connector, channel and audience. The dispatcher delivers them like sends and deletes each
once the platform accepted it (:mod:`cadence.connectors.delivery`).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine, delete, func, insert, or_, select, update

from cadence.clock import now_ms
from cadence.connectors.base import AUDIENCE_TARGET_KEYS, Connector
from cadence.engine.campaign import EvalContext
from cadence.engine.consent import consent_of
from cadence.engine.identity import identities_of, resolve_customer
from cadence.engine.loop import EngineLoop, lock_batches
from cadence.engine.profiles import load_profile
from cadence.errors import IdentityError
from cadence.runtime import Runtime
from cadence.store.db import read_connection
from cadence.store.schema.connectors import outbox
from cadence.store.schema.core import customers, erasures, events, identities, profiles
from cadence.store.schema.scheduler import audience_members
from cadence.store.schema.sends import audience_removals, sends

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
    one, a loop with the standard subscribers is built. Returns the counts recorded:
    ``events_removed``, ``identities_removed`` and ``audience_removals_queued`` (the
    removals from remote ad audiences the dispatcher will deliver).
    """
    loop = loop or EngineLoop(runtime)
    # The loop's lock first, then the batch lock, in the order a batch takes them.
    with loop.held(), runtime.engine.begin() as conn:
        # Serialised with the loop's batches: a batch committing a profile row for this customer
        # meanwhile would outlive the erasure.
        lock_batches(conn)
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
        now = now_ms()
        # Before the traits and sends go: what the ad platforms need to take the customer out.
        removals = _remote_removals(conn, runtime, cid, members, now)
        # Recorded before the subscribers are told (its counts after): the learners' snapshot in
        # the erasure's transaction then counts it as met, and this process's learners are not
        # loaded again for an erasure of their own (LearnerSubscriber.erasure_unmet).
        erasure_id = conn.execute(
            insert(erasures).values(
                requested_ms=now,
                requested_by=requested_by,
                customer_ids_to=ids_to,
                events_removed=0,
                identities_removed=0,
                audience_removals_queued=0,
            )
        ).inserted_primary_key[0]
        loop.erase(conn, members)
        removed = conn.execute(delete(events).where(_event_filter(ids))).rowcount
        n_ids = conn.execute(delete(identities).where(identities.c.customer_id.in_(members))).rowcount
        # Tables keyed by customer without a cascading key: the dry-run outbox's messages (addresses,
        # rendered variables) and the ad audiences the customer was synced to.
        conn.execute(delete(outbox).where(outbox.c.customer_id.in_(members)))
        conn.execute(delete(audience_members).where(audience_members.c.customer_id.in_(members)))
        conn.execute(customers.update().where(customers.c.id.in_(members)).values(merged_into=None))
        conn.execute(delete(customers).where(customers.c.id.in_(members)))
        counts = {
            "events_removed": int(removed),
            "identities_removed": int(n_ids),
            "audience_removals_queued": len(removals),
        }
        conn.execute(update(erasures).where(erasures.c.id == erasure_id).values(**counts))
        if removals:
            conn.execute(insert(audience_removals), [{**r, "erasure_id": erasure_id} for r in removals])
    return counts


def _never_went(row: Any) -> bool:
    """A membership send the platform never saw: never claimed, or settled without a provider call.

    ``queued`` with no attempt counted: never claimed, or refused with a 429 or an open circuit
    (their attempt is given back); one an operator re-queued (attempts reset) may have gone before.
    """
    if row.status in ("suppressed", "expired"):
        return True
    requeued = (row.last_error or "").startswith("re-queued by an operator")
    return row.status == "queued" and not row.attempts and not requeued


def _remote_removals(
    conn: Any, runtime: Runtime, cid: int, members: list[int], now: int
) -> list[dict[str, Any]]:
    """The ``audience_removals`` rows for every ad audience the customer may be in (not yet inserted).

    An audience counts when cadence holds the customer as a member (``audience_members``) or
    a removal of theirs has not gone out yet (the cascade is about to delete it), unless
    every membership send of that campaign is one the platform never saw (an ``add`` still
    queued: nothing went). The audience, channel and connector are those of the customer's
    latest membership send, as the push queued it; when compaction deleted those, the
    campaign's as the rules give it now. Identifiers are hashed from the traits of the
    customer and of everyone merged into them, one removal per distinct set.
    """
    in_audience = set(
        conn.scalars(select(audience_members.c.campaign).where(audience_members.c.customer_id.in_(members)))
    )
    history: dict[str, list[Any]] = {}
    for row in conn.execute(
        select(sends.c.campaign, sends.c.channel, sends.c.connector, sends.c.variables, sends.c.status,
               sends.c.attempts, sends.c.last_error)
        .where(sends.c.customer_id.in_(members))
        .order_by(sends.c.id)
    ):  # fmt: skip
        if (row.variables or {}).get("operation") in ("add", "remove"):
            history.setdefault(row.campaign, []).append(row)
    wanted: list[str] = []
    for campaign in sorted(in_audience | set(history)):
        rows = history.get(campaign, [])
        pending_remove = any(
            r.variables["operation"] == "remove" and r.status in ("queued", "sending", "failed") for r in rows
        )
        if campaign not in in_audience and not pending_remove:
            continue
        if rows and all(_never_went(r) for r in rows):
            continue
        wanted.append(campaign)
    if not wanted:
        return []
    from cadence.plugins.manager import (  # noqa: PLC0415 - plugins load only for an erasure that needs them
        connector_classes,
        make_plugin_manager,
        serving_classes,
    )

    settings = runtime.settings
    pm = make_plugin_manager(settings)
    classes, serving = connector_classes(pm, settings), serving_classes(settings, pm=pm)
    traits = [
        dict(t or {})
        for t in conn.scalars(
            select(profiles.c.traits)
            .where(profiles.c.customer_id.in_(members))
            .order_by(profiles.c.customer_id != cid, profiles.c.customer_id)
        )
    ]
    found: list[dict[str, Any]] = []
    unresolved: list[str] = []
    for campaign in wanted:
        target = _target_of(conn, runtime, cid, campaign, history.get(campaign, []), now)
        if target is None:
            unresolved.append(campaign)
            continue
        channel, connector_name, variables = target
        cls: type[Connector] | None = classes.get(connector_name) if connector_name else serving.get(channel)
        if cls is None:
            unresolved.append(campaign)
            continue
        seen: list[dict[str, str]] = []
        for these in traits:
            hashed = cls.audience_identifiers(these)
            if hashed and hashed not in seen:
                seen.append(hashed)
        for hashed in seen:
            found.append(
                {
                    "campaign": campaign,
                    "channel": channel,
                    "connector": cls.name,
                    "variables": variables,
                    "identifiers": hashed,
                    "status": "queued",
                    "attempts": 0,
                    "created_ms": now,
                    "updated_ms": now,
                }
            )
    if unresolved:
        log.warning(
            "the erased customer was in the ad audiences of %s, whose audience cadence no longer knows"
            " (campaign gone from the rules, its sends compacted, or no connector serves it):"
            " remove them there with the platform's own tools",
            ", ".join(unresolved),
        )
    return found


def _target_of(
    conn: Any, runtime: Runtime, cid: int, campaign: str, rows: list[Any], now: int
) -> tuple[str, str | None, dict[str, Any]] | None:
    """(channel, connector or None for the channel's, removal variables) of a campaign's audience."""
    if rows:
        latest = rows[-1]
        channel, connector, variables = latest.channel, latest.connector, dict(latest.variables or {})
    else:
        from cadence.engine.attribution.online import _rules_holder  # noqa: PLC0415 - the one rules holder

        ruleset = getattr(_rules_holder(runtime), "current", None)
        compiled = ruleset.campaigns.get(campaign) if ruleset is not None else None
        if compiled is None or compiled.kind != "audience":
            return None
        try:
            variables = compiled.template.variables(
                EvalContext(profile=load_profile(conn, cid, now_ms=now), now_ms=now)
            )
        except Exception:  # noqa: BLE001 - a rule that cannot be evaluated leaves the audience unknown
            log.exception("campaign %s: could not evaluate its audience variables", campaign)
            return None
        channel, connector = compiled.channels.channels[0], None
    kept = {k: variables[k] for k in AUDIENCE_TARGET_KEYS if variables.get(k) not in (None, "")}
    return channel, connector, {**kept, "operation": "remove"}
