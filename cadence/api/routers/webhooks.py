"""Provider webhooks (``POST /v1/webhooks/{connector}``), the plugin list, and the dispatcher's lifecycle.

A webhook is verified on its raw body before anything is parsed; a forged, stale or
malformed request gets 401 or 400 and a log line saying why. Accepted provider events
become cadence feedback events (Segment names for email, generic ``Message ...`` names
otherwise; ``Unsubscribed`` and ``Spam Reported`` for opt-outs, which the engine turns
into consent) with ``properties.decision_id``, ``campaign`` and ``channel``, appended to
the event log under ``message_id = "<connector>:<provider event id>"``, so a provider's
retry is a duplicate, not a second event.

:func:`setup` builds the plugin manager and the connectors when the app is created,
mounts plugin routers, and (with ``background=True``) runs the send-queue dispatcher.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import Engine, select

from cadence.api.security import Principal, Scope
from cadence.channels import Feedback
from cadence.clock import now_ms
from cadence.connectors.base import ProviderEvent, WebhookRequest
from cadence.connectors.delivery import Dispatcher
from cadence.engine.events import NewEvent
from cadence.engine.ingest import record_events
from cadence.errors import WebhookRejected
from cadence.plugins.manager import (
    CadencePluginManager,
    ConnectorRegistry,
    build_connectors,
    call_each,
    make_plugin_manager,
)
from cadence.scheduler.leading import AlwaysLeads, dispatch_while_leading
from cadence.store.db import read_connection
from cadence.store.schema.core import identities, profiles
from cadence.store.schema.sends import sends

__all__ = ["event_name", "router", "setup", "to_new_events"]

log = logging.getLogger("cadence.webhooks")
router = APIRouter(tags=["webhooks"])

#: Segment's email names; every other channel uses the generic names.
EMAIL_NAMES = {
    Feedback.DELIVERED: "Email Delivered",
    Feedback.OPENED: "Email Opened",
    Feedback.CLICKED: "Email Link Clicked",
    Feedback.BOUNCED: "Email Bounced",
}
GENERIC_NAMES = {
    Feedback.SENT: "Message Sent",
    Feedback.DELIVERED: "Message Delivered",
    Feedback.OPENED: "Message Opened",
    Feedback.CLICKED: "Message Clicked",
    Feedback.BOUNCED: "Message Bounced",
    Feedback.FAILED: "Message Failed",
    Feedback.UNSUBSCRIBED: "Unsubscribed",
    Feedback.SPAM_REPORT: "Spam Reported",
    Feedback.CONVERTED: "Converted",
}


def event_name(kind: Feedback, channel: str) -> str:
    """The event-log name of a feedback kind on a channel.

    >>> event_name(Feedback.OPENED, "email"), event_name(Feedback.OPENED, "sms")
    ('Email Opened', 'Message Opened')
    >>> event_name(Feedback.SPAM_REPORT, "email")
    'Spam Reported'
    """
    if channel == "email" and kind in EMAIL_NAMES:
        return EMAIL_NAMES[kind]
    return GENERIC_NAMES[kind]


def _message_id(connector: str, event_id: str) -> str:
    mid = f"{connector}:{event_id}"
    if len(mid) <= 100:
        return mid
    return f"{connector}:h:" + hashlib.sha256(event_id.encode()).hexdigest()[:64]


@dataclass(frozen=True)
class _Link:
    user_id: str | None
    anonymous_id: str | None
    decision_id: str | None
    campaign: str | None


#: The customer trait that holds each channel's address, for events not linked to a send.
ADDRESS_TRAIT = {"email": "email", "sms": "phone"}


def _link_all(engine: Engine, items: Sequence[ProviderEvent]) -> list[_Link]:
    """Link each provider event to its send and customer, with a handful of queries per webhook.

    By decision id first; then by the provider's message id when it names exactly one
    customer (SendGrid's id is shared by a whole request); then by the address trait
    (email, phone) in the customer's profile.
    """
    decisions = sorted({i.decision_id for i in items if i.decision_id})
    message_ids = sorted({i.provider_message_id for i in items if i.provider_message_id})
    with read_connection(engine) as conn:
        by_decision: dict[str, tuple[int, str]] = {}
        for start in range(0, len(decisions), 500):
            rows = conn.execute(
                select(sends.c.decision_id, sends.c.customer_id, sends.c.campaign)
                .where(sends.c.decision_id.in_(decisions[start : start + 500]))
                .order_by(sends.c.id)
            )
            by_decision.update({d: (c, camp) for d, c, camp in rows})
        by_message: dict[str, set[tuple[int, str, str | None]]] = {}
        for start in range(0, len(message_ids), 500):
            matches = conn.execute(
                select(
                    sends.c.provider_message_id, sends.c.customer_id, sends.c.campaign, sends.c.decision_id
                ).where(sends.c.provider_message_id.in_(message_ids[start : start + 500]))
            )
            for mid, cid, camp, did in matches:
                by_message.setdefault(mid, set()).add((cid, camp, did))
        by_address: dict[tuple[str, str], int] = {}
        for item in items:
            trait = ADDRESS_TRAIT.get(item.channel)
            linked = (item.decision_id in by_decision) or len(
                by_message.get(item.provider_message_id or "", ())
            ) == 1
            if linked or trait is None or not item.recipient or (trait, item.recipient) in by_address:
                continue
            found = conn.scalar(
                select(profiles.c.customer_id)
                .where(profiles.c.traits[trait].as_string() == item.recipient)
                .limit(1)
            )
            if found is not None:
                by_address[(trait, item.recipient)] = found
        plan: list[tuple[int | None, str | None, str | None]] = []
        for item in items:
            customer: int | None = None
            decision_id, campaign = item.decision_id, item.campaign
            if item.decision_id in by_decision:
                customer, found_campaign = by_decision[item.decision_id]
                campaign = campaign or found_campaign
            elif len(by_message.get(item.provider_message_id or "", ())) == 1:
                [(customer, found_campaign, found_decision)] = by_message[item.provider_message_id or ""]
                campaign, decision_id = campaign or found_campaign, decision_id or found_decision
            elif item.recipient and (ADDRESS_TRAIT.get(item.channel), item.recipient) in by_address:
                customer = by_address[(ADDRESS_TRAIT[item.channel], item.recipient)]
            plan.append((customer, decision_id, campaign))
        wanted = sorted({c for c, _, _ in plan if c is not None})
        users: dict[int, str] = {}
        anonymous: dict[int, str] = {}
        for start in range(0, len(wanted), 500):
            ids = conn.execute(
                select(identities.c.customer_id, identities.c.kind, identities.c.value)
                .where(identities.c.customer_id.in_(wanted[start : start + 500]))
                .order_by(identities.c.first_seen_ms, identities.c.value)
            )
            for cid, kind, value in ids:
                (users if kind == "user" else anonymous).setdefault(cid, value)
    links = []
    for item, (customer, decision_id, campaign) in zip(items, plan, strict=True):
        user_id = item.user_id or (users.get(customer) if customer is not None else None)
        anonymous_id = None if user_id else (anonymous.get(customer) if customer is not None else None)
        links.append(_Link(user_id, anonymous_id, decision_id, campaign))
    return links


def to_new_events(
    *,
    engine: Engine,
    pm: CadencePluginManager,
    connector: str,
    items: Sequence[ProviderEvent],
    received_ms: int,
) -> list[NewEvent]:
    """Normalise provider events into cadence feedback events linked to their send and decision."""
    found = []
    for item, link in zip(items, _link_all(engine, items), strict=True):
        user_id, anonymous_id, decision_id, campaign = (
            link.user_id,
            link.anonymous_id,
            link.decision_id,
            link.campaign,
        )
        if user_id is None and anonymous_id is None:
            answers = call_each(pm, "cadence_resolve_identity", connector=connector, provider_event=item)
            user_id = str(answers[0][1]) if answers else None
        if user_id is None and anonymous_id is None:
            # Unknown recipient: keep the event under a pseudonymous id, never the address itself.
            basis = item.recipient or item.provider_message_id or item.event_id
            anonymous_id = f"{connector}:" + hashlib.sha256(basis.encode()).hexdigest()[:32]
        properties: dict[str, Any] = {
            **dict(item.properties),
            "connector": connector,
            "provider_event_id": item.event_id,
        }
        if item.provider_message_id:
            properties["provider_message_id"] = item.provider_message_id
        for _plugin, extra in call_each(
            pm,
            "cadence_enrich_feedback",
            connector=connector,
            provider_event=item,
            properties=dict(properties),
        ):
            properties.update(dict(extra))
        properties.update({"decision_id": decision_id, "campaign": campaign, "channel": item.channel})
        found.append(
            NewEvent(
                message_id=_message_id(connector, item.event_id),
                type="track",
                event=event_name(item.kind, item.channel),
                user_id=user_id,
                anonymous_id=anonymous_id,
                ts_ms=item.ts_ms,
                payload={"properties": properties},
                source=f"webhook:{connector}",
                received_ms=received_ms,
            )
        )
    return found


def _registry(request: Request) -> ConnectorRegistry:
    registry: ConnectorRegistry = request.app.state.connectors
    return registry


async def _as_webhook_request(request: Request) -> WebhookRequest:
    return WebhookRequest(
        method=request.method,
        url=str(request.url),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=await request.body(),
        query=dict(request.query_params),
    )


def _rejected(connector: str, exc: WebhookRejected, request: Request) -> JSONResponse:
    client = request.client.host if request.client else "?"
    log.warning("webhook %s from %s rejected (%d): %s", connector, client, exc.status, exc)
    return JSONResponse(status_code=exc.status, content={"error": str(exc)})


@router.get("/v1/webhooks/{connector}", response_class=PlainTextResponse)
async def webhook_handshake(connector: str, request: Request) -> Any:
    """Answer a provider's subscription handshake (Meta: echo ``hub.challenge`` if the token matches)."""
    receiver = _registry(request).webhook_receiver(connector)
    if receiver is None or not hasattr(receiver, "webhook_challenge"):
        return JSONResponse(status_code=404, content={"error": f"no connector called {connector!r}"})
    try:
        answer = receiver.webhook_challenge(await _as_webhook_request(request))
    except WebhookRejected as exc:
        return _rejected(connector, exc, request)
    if answer is None:
        return JSONResponse(status_code=400, content={"error": "not a verification request"})
    return PlainTextResponse(answer)


@router.post("/v1/webhooks/{connector}")
async def receive_webhook(connector: str, request: Request) -> JSONResponse:
    """Verify, normalise, deduplicate and append a provider's event report."""
    receiver = _registry(request).webhook_receiver(connector)
    if receiver is None:
        return JSONResponse(status_code=404, content={"error": f"no connector called {connector!r}"})
    hook = await _as_webhook_request(request)
    try:
        receiver.verify_webhook(hook)
        items = await run_in_threadpool(receiver.parse_webhook, hook)
    except WebhookRejected as exc:
        return _rejected(connector, exc, request)
    engine = request.app.state.runtime.engine
    pm = request.app.state.plugin_manager
    received = now_ms()
    new_events = await run_in_threadpool(
        to_new_events, engine=engine, pm=pm, connector=connector, items=items, received_ms=received
    )
    result = await run_in_threadpool(record_events, engine=engine, batch=new_events)
    metrics = request.app.state.metrics
    metrics.events_accepted.labels(f"webhook:{connector}").inc(result.accepted)
    metrics.events_duplicate.labels(f"webhook:{connector}").inc(result.duplicates)
    wake = getattr(request.app.state, "wake_engine", None)
    if wake is not None and result.accepted:
        wake()
    return JSONResponse({"accepted": result.accepted, "duplicates": result.duplicates})


@router.get("/v1/plugins")
def list_plugins(request: Request, _principal: Annotated[Principal, Scope("admin")]) -> dict[str, Any]:
    """Every plugin (built-in or installed), its hooks and load error, and the connectors it provides."""
    pm: CadencePluginManager = request.app.state.plugin_manager
    registry = _registry(request)
    return {
        "plugins": [info.as_dict() for info in pm.infos],
        "connectors": [
            {
                "name": c.name,
                "channels": sorted(c.channels),
                "enabled": c.name in registry.enabled or c.name == "outbox",
                "capabilities": vars(c.capabilities) if hasattr(c.capabilities, "__dict__") else {},
                "module": type(c).__module__,
            }
            for c in registry.connectors.values()
        ],
    }


def dispatch_rules_of(runtime: Any) -> Any:
    """The rules the dispatcher checks sends against: the runtime's loaded ruleset.

    Until the runtime's own holder has rules (the scheduler or a request loads them), the rule
    files are read through attribution's holder, which retries a failed load every so often:
    a send due at start-up is checked too. None when no rules can be loaded.
    """
    from cadence.engine.attribution.online import _rules_holder  # noqa: PLC0415 - one holder logic

    return getattr(_rules_holder(runtime), "current", None)


def setup(app: FastAPI) -> None:
    """Build the plugins and connectors for ``app``; mount plugin routers; run the dispatcher."""
    runtime = app.state.runtime
    settings = runtime.settings
    pm = make_plugin_manager(settings)
    app.state.plugin_manager = pm
    app.state.connectors = build_connectors(settings, pm=pm, engine=runtime.engine)
    for name in app.state.connectors.enabled:
        missing = app.state.connectors.connectors[name].missing_settings()
        if missing:
            log.error(
                "connector %s is configured but cannot send without %s: its sends are dead-lettered "
                "until that is set (then `cadence sends requeue --failed-with ConfigError`)",
                name,
                ", ".join(missing),
            )
    for plugin_name, routers in call_each(pm, "cadence_register_routers", settings=settings):
        for extra in routers:
            try:
                app.include_router(extra)
            except Exception as exc:  # noqa: BLE001 - a bad router must not stop the API
                pm.mark_failed(plugin_name, exc)

    async def start(app: FastAPI) -> None:
        if not app.state.background:
            return
        registry: ConnectorRegistry = app.state.connectors
        loop = getattr(app.state, "engine_loop", None)
        dispatcher = Dispatcher(
            engine=runtime.engine,
            route=registry.route,
            clock=runtime.clock,
            before_round=loop.catch_up if loop is not None and app.state.settings.engine_enabled else None,
            rules=lambda: dispatch_rules_of(runtime),
        )
        stop = asyncio.Event()
        app.state.dispatcher = dispatcher
        app.state.dispatcher_stop = stop
        # Only the leader (the process holding the engine loop's lock) dispatches; on taking
        # over, the dispatcher first settles the sends a dead leader left in doubt.
        app.state.dispatcher_task = asyncio.create_task(
            dispatch_while_leading(
                dispatcher,
                leadership=loop.leadership if loop is not None else AlwaysLeads(),
                stop=stop,
            )
        )

    async def stop(app: FastAPI) -> None:
        task = getattr(app.state, "dispatcher_task", None)
        if task is not None:
            app.state.dispatcher_stop.set()
            try:
                await asyncio.wait_for(task, 30)
            except Exception:  # noqa: BLE001 - shutting down: log and go
                log.exception("dispatcher did not stop cleanly")
        await app.state.connectors.aclose()

    app.state.on_startup.append(start)
    app.state.on_shutdown.append(stop)
