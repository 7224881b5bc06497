"""From identify to delivery to unsubscribe and back, through the real engine loop and the fake SendGrid."""

from __future__ import annotations

import asyncio
import time

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from cadence.api.app import create_app
from cadence.connectors.delivery import Dispatcher
from cadence.connectors.testing import FakeProviders, connector_config, sendgrid_request
from cadence.engine.consent import may_send
from cadence.engine.events import parse_call
from cadence.engine.identity import resolve_customer
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop
from cadence.engine.sendqueue import enqueue_send
from cadence.plugins.manager import build_connectors
from cadence.runtime import open_runtime
from cadence.settings import Settings
from cadence.store.schema.sends import sends


async def test_an_unsubscribe_webhook_stops_the_next_send(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    settings = Settings(
        database_url=str(db_engine.url),
        disable_plugin_autoload=True,
        connectors={"sendgrid": connector_config("sendgrid", fake.base_url)},
        _env_file=None,  # type: ignore[call-arg]
    )
    runtime = open_runtime(settings, engine=db_engine)
    identify = {
        "type": "identify",
        "userId": "ada",
        "traits": {"email": "ada@example.com"},
        "messageId": "i1",
    }
    record_events(engine=db_engine, batch=[parse_call(identify, received_ms=int(time.time() * 1000))])
    loop = EngineLoop(runtime)
    loop.catch_up()
    with db_engine.connect() as conn:
        customer = resolve_customer(conn, "ada")
    assert customer is not None

    app = create_app(runtime=runtime, background=False)
    registry = build_connectors(settings, pm=app.state.plugin_manager, engine=db_engine, client=http)
    dispatcher = Dispatcher(engine=db_engine, route=registry.route)

    with db_engine.begin() as conn:
        enqueue_send(
            conn,
            key="spring:ada:1",
            campaign="spring",
            customer_id=customer,
            channel="email",
            due_ms=0,
            now_ms=0,
            template="d-spring",
            decision_id="dec-1",
        )
    assert (await dispatcher.drain()).sent == 1
    assert list(fake.delivered) == ["spring:ada:1"]

    unsubscribe = [
        {
            "email": "ada@example.com",
            "event": "unsubscribe",
            "sg_event_id": "u1",
            "timestamp": int(time.time()),
            "decision_id": "dec-1",
            "campaign": "spring",
        }
    ]
    request = sendgrid_request(unsubscribe)
    answer = TestClient(app).post(
        "/v1/webhooks/sendgrid", content=request.body, headers=dict(request.headers)
    )
    assert answer.json() == {"accepted": 1, "duplicates": 0}

    with db_engine.begin() as conn:
        enqueue_send(
            conn,
            key="spring:ada:2",
            campaign="spring",
            customer_id=customer,
            channel="email",
            due_ms=0,
            now_ms=0,
            template="d-spring",
            decision_id="dec-2",
        )
    # No explicit catch-up: the serving dispatcher applies the log before each round,
    # so the opt-out that just arrived is in consent before the send is claimed.
    stop = asyncio.Event()

    def catch_up_once() -> None:
        loop.catch_up()
        stop.set()  # one round, then stop

    serving = Dispatcher(engine=db_engine, route=registry.route, before_round=catch_up_once)
    report = await serving.run(stop=stop)
    assert (report.sent, report.suppressed) == (0, 1)
    with db_engine.connect() as conn:
        assert not may_send(conn, customer, "email")
        assert may_send(conn, customer, "push")  # only the channel the customer left
    assert list(fake.delivered) == ["spring:ada:1"]
    with db_engine.connect() as conn:
        assert (
            conn.scalar(select(sends.c.status).where(sends.c.idempotency_key == "spring:ada:2"))
            == "suppressed"
        )
