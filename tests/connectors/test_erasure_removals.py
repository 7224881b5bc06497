"""Erasure takes the customer out of the ad audiences cadence synced them to, over the platforms' APIs.

A customer is pushed into a Meta custom audience and a Google Customer Match list (the real
push and dispatcher, the fake platforms over loopback HTTP), then erased: the erasure stores
only each connector's hashes, the dispatcher delivers the removals (through a 429 and a Graph
throttle) and deletes them, and nothing in the database names the customer afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import Engine, insert, select, update

from cadence.clock import FixedClock
from cadence.connectors.delivery import Dispatcher
from cadence.connectors.operator import list_removals, requeue_removals
from cadence.connectors.testing import FakeProviders, connector_config
from cadence.engine.privacy import erase_customer
from cadence.plugins.manager import ConnectorRegistry, build_connectors, make_plugin_manager
from cadence.runtime import Runtime, open_runtime
from cadence.scheduler.seed import SeedCustomer, seed_customers
from cadence.settings import Settings
from cadence.store.schema.base import metadata
from cadence.store.schema.core import customers, identities
from cadence.store.schema.sends import audience_removals, sends
from tests.scheduler.conftest import MONDAY, Rules, make_scheduler

HOUR = 3_600_000
DAY = 24 * HOUR
USER_LIST = "customers/1234567890/userLists/66"

SYNCED = f"""
event opened = "Email Opened"
campaign readers_fb "Readers, on Facebook" {{
    audience  count(opened within 30d) > 0
    sync      audience to facebook with {{ audience_id: "aud-1" }}
    schedule  every day at 09:00 in "Europe/Berlin"
}}
campaign readers_google "Readers, on Google" {{
    audience  count(opened within 30d) > 0
    sync      audience to google_ads with {{ user_list: "{USER_LIST}" }}
    schedule  every day at 09:00 in "Europe/Berlin"
}}
"""

ERIN = {"email": " Erin@Example.com", "phone": "+1 (415) 555-0101"}
OLAF = {"email": "olaf@example.com", "phone": "+1 415 555 0199"}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


ERIN_META = {("EMAIL", sha("erin@example.com")), ("PHONE", sha("14155550101"))}
ERIN_GOOGLE = {("hashedEmail", sha("erin@example.com")), ("hashedPhoneNumber", sha("+14155550101"))}


def connectors(fake: FakeProviders) -> dict[str, Any]:
    return {name: connector_config(name, fake.base_url) for name in ("facebook", "google_ads")}


@pytest.fixture
def ads_runtime(db_engine: Engine, settings: Settings, fake: FakeProviders) -> Runtime:
    """A runtime with Meta and Google configured against the fakes, and the audience rules loaded."""
    configured = settings.model_copy(
        update={"database_url": str(db_engine.url), "connectors": connectors(fake)}
    )
    runtime = open_runtime(configured, engine=db_engine)
    runtime.extensions["rules"] = Rules(SYNCED)
    return runtime


def registry(runtime: Runtime, http: httpx.AsyncClient) -> ConnectorRegistry:
    settings = runtime.settings
    return build_connectors(settings, pm=make_plugin_manager(settings), engine=runtime.engine, client=http)


def synced(runtime: Runtime) -> None:
    """Erin (1) and Olaf (2) read the newsletter; the push queues their audience adds."""
    seed_customers(
        runtime.engine,
        [
            SeedCustomer(id=1, traits=ERIN, events={"Email Opened": [MONDAY - 2 * DAY]}),
            SeedCustomer(id=2, traits=OLAF, events={"Email Opened": [MONDAY - 2 * DAY]}),
        ],
        now_ms=MONDAY,
    )
    with runtime.engine.begin() as conn:
        conn.execute(
            insert(identities),
            [
                {"kind": "user", "value": name, "customer_id": cid, "first_seen_ms": 0}
                for cid, name in ((1, "erin"), (2, "olaf"))
            ],
        )
    clock = FixedClock(MONDAY)
    scheduler = make_scheduler(runtime.engine, runtime.extensions["rules"], clock)
    scheduler.tick()
    clock.set(MONDAY + 8 * HOUR)
    scheduler.tick()


def database_text(engine: Engine) -> str:
    """Every row of every table, as text: what an erased customer must not be found in."""
    found = []
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            found += [str(tuple(row)) for row in conn.execute(select(table))]
    return "\n".join(found).lower()


async def test_an_erased_customer_is_removed_from_the_meta_and_google_audiences(
    ads_runtime: Runtime, fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    synced(ads_runtime)
    dispatcher = Dispatcher(engine=ads_runtime.engine, route=registry(ads_runtime, http).route)
    assert (await dispatcher.drain()).sent == 4
    assert fake.audiences["meta:aud-1"] >= ERIN_META
    assert fake.audiences[f"google:{USER_LIST}"] >= ERIN_GOOGLE

    counts = erase_customer(runtime=ads_runtime, ref="erin", requested_by="test")
    assert counts["audience_removals_queued"] == 2
    # Until delivered the database holds Erin's hashes, and nothing else of hers.
    with ads_runtime.engine.connect() as conn:
        stored = {r.connector: r for r in conn.execute(select(audience_removals))}
        assert not conn.execute(select(sends.c.id).where(sends.c.customer_id == 1)).first()
    assert set(stored["facebook"].identifiers.items()) == ERIN_META
    assert set(stored["google_ads"].identifiers.items()) == ERIN_GOOGLE
    assert stored["facebook"].variables == {"audience_id": "aud-1", "operation": "remove"}
    assert stored["google_ads"].variables == {"user_list": USER_LIST, "operation": "remove"}
    text = database_text(ads_runtime.engine)
    assert "erin" not in text and "555-0101" not in text and "14155550101" not in text
    assert sha("erin@example.com") in text

    # Google answers 429 with Retry-After: 1, Meta a custom-audience throttle (code 80003).
    fake.fail_next(
        "google_ads",
        429,
        {"error": {"code": 429, "message": "Too many requests", "status": "RESOURCE_EXHAUSTED"}},
        headers={"Retry-After": "1"},
    )
    fake.fail_next(
        "facebook",
        400,
        {"error": {"message": "User request limit reached", "type": "OAuthException", "code": 80003}},
    )
    fake.calls.clear()
    started = time.monotonic()
    report = await dispatcher.drain()
    assert time.monotonic() - started >= 1.0  # the wait Google asked for
    assert (report.audience_removals, report.sent, report.failed) == (2, 2, 0)

    meta = [c for c in fake.calls_to("facebook") if c.method == "DELETE"]
    assert [c.status for c in meta] == [400, 200] and meta[-1].path == "/v21.0/aud-1/users"
    assert meta[-1].body["payload"] == {
        "schema": ["EMAIL", "PHONE"],
        "data": [[sha("erin@example.com"), sha("14155550101")]],
    }
    google = fake.calls_to("google_ads")
    assert [c.status for c in google][:2] == [429, 200]  # the job was created after the wait
    [operations] = [c.body["operations"] for c in google if c.path.endswith(":addOperations")]
    assert operations == [
        {
            "remove": {
                "userIdentifiers": [
                    {"hashedEmail": sha("erin@example.com")},
                    {"hashedPhoneNumber": sha("+14155550101")},
                ]
            }
        }
    ]
    # The platforms no longer hold Erin, still hold Olaf; the hashes are gone from the database.
    assert (
        not ERIN_META & fake.audiences["meta:aud-1"]
        and not ERIN_GOOGLE & fake.audiences[f"google:{USER_LIST}"]
    )
    assert ("EMAIL", sha("olaf@example.com")) in fake.audiences["meta:aud-1"]
    assert list_removals(ads_runtime.engine) == []
    text = database_text(ads_runtime.engine)
    assert sha("erin@example.com") not in text and sha("14155550101") not in text


async def test_a_refused_removal_stays_visible_until_requeued_and_delivered(
    ads_runtime: Runtime, fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    synced(ads_runtime)
    dispatcher = Dispatcher(engine=ads_runtime.engine, route=registry(ads_runtime, http).route)
    await dispatcher.drain()
    erase_customer(runtime=ads_runtime, ref="erin", requested_by="test")
    fake.fail_next(
        "facebook", 400, {"error": {"message": "Invalid parameter", "type": "OAuthException", "code": 100}}
    )
    report = await dispatcher.drain()
    assert (report.sent, report.failed) == (1, 1)
    [failed] = list_removals(ads_runtime.engine, status="failed")
    assert failed["connector"] == "facebook" and "Invalid parameter" in failed["last_error"]
    assert "identifiers" not in failed  # the operator's view never shows the hashes
    assert requeue_removals(ads_runtime.engine, ids=[failed["id"]], now_ms=0).done == [failed["id"]]
    assert (await dispatcher.drain()).sent == 1
    assert list_removals(ads_runtime.engine) == [] and not ERIN_META & fake.audiences["meta:aud-1"]


async def test_an_add_in_doubt_is_followed_by_a_removal_one_never_sent_is_not(
    ads_runtime: Runtime, fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    """Erin's Meta add was claimed when the dispatcher died (it may have reached Meta): removed.

    Her Google add was never claimed (nothing went): the cascade takes it, nothing to remove.
    """
    synced(ads_runtime)
    with ads_runtime.engine.begin() as conn:
        conn.execute(
            update(sends)
            .where(sends.c.customer_id == 1, sends.c.campaign == "readers_fb")
            .values(status="sending", attempts=1, connector="facebook")
        )
    counts = erase_customer(runtime=ads_runtime, ref="erin", requested_by="test")
    assert counts["audience_removals_queued"] == 1
    [removal] = list_removals(ads_runtime.engine)
    assert (removal["campaign"], removal["status"]) == ("readers_fb", "queued")


async def test_removals_found_from_the_rules_once_the_sends_are_compacted(
    ads_runtime: Runtime, fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    """The audience sends went out long ago and compaction deleted them: the rules name the audience."""
    synced(ads_runtime)
    dispatcher = Dispatcher(engine=ads_runtime.engine, route=registry(ads_runtime, http).route)
    await dispatcher.drain()
    with ads_runtime.engine.begin() as conn:
        conn.execute(sends.delete())
    assert (
        erase_customer(runtime=ads_runtime, ref="erin", requested_by="test")["audience_removals_queued"] == 2
    )
    assert (await dispatcher.drain()).sent == 2
    assert (
        not ERIN_META & fake.audiences["meta:aud-1"]
        and not ERIN_GOOGLE & fake.audiences[f"google:{USER_LIST}"]
    )


async def test_the_dry_run_outbox_records_removals_and_the_operator_sees_them(
    db_engine: Engine, settings: Settings, fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    """No ad connector configured: the audiences went to the outbox, and so do the removals.

    Erased over the API, listed by ``GET /v1/sends/removals`` and ``cadence sends removals``
    (no hashes), recorded by the outbox for customer 0 with the identifiers' names only.
    """
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from cadence.api.app import create_app
    from cadence.cli import app as cli
    from cadence.keys import create_key
    from cadence.store.schema.connectors import outbox

    runtime = open_runtime(settings.model_copy(update={"database_url": str(db_engine.url)}), engine=db_engine)
    runtime.extensions["rules"] = Rules(SYNCED)
    synced(runtime)
    dispatcher = Dispatcher(engine=db_engine, route=registry(runtime, http).route)
    assert (await dispatcher.drain()).sent == 4
    client = TestClient(create_app(runtime=runtime, background=False))
    key = create_key(db_engine, name="admin", scopes=["admin"])
    admin = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    erased = client.delete("/v1/customers/erin", headers=admin)
    assert erased.json() == {"events_removed": 0, "identities_removed": 1, "audience_removals_queued": 2}
    listed = client.get("/v1/sends/removals", headers=admin).json()["removals"]
    assert {(r["campaign"], r["connector"], r["status"]) for r in listed} == {
        ("readers_fb", "outbox", "queued"),
        ("readers_google", "outbox", "queued"),
    }
    assert all("identifiers" not in r for r in listed)
    assert client.get("/v1/sends/removals?status=lost", headers=admin).status_code == 422
    url = db_engine.url.render_as_string(hide_password=False)
    shown = CliRunner().invoke(cli, ["--database-url", url, "sends", "removals", "--json"])
    assert shown.exit_code == 0, shown.output
    assert len(orjson.loads(shown.stdout)) == 2

    assert (await dispatcher.drain()).audience_removals == 2
    with db_engine.connect() as conn:
        recorded = [r.message for r in conn.execute(select(outbox).where(outbox.c.customer_id == 0))]
        assert not conn.execute(select(outbox).where(outbox.c.customer_id == 1)).first()
    assert sorted(m["variables"]["operation"] for m in recorded) == ["remove", "remove"]
    assert [m["identifiers"] for m in recorded] == [["email_sha256", "phone_sha256"]] * 2
    assert sha("erin@example.com") not in database_text(db_engine)


async def test_a_running_dispatcher_delivers_removals_queued_while_it_runs(
    ads_runtime: Runtime, fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    """``run`` looks for removals every ``removals_poll_seconds`` while there are none, not every round."""
    synced(ads_runtime)
    dispatcher = Dispatcher(engine=ads_runtime.engine, route=registry(ads_runtime, http).route)
    dispatcher.removals_poll_seconds = 0.3
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop=stop, poll_seconds=0.05))
    try:
        for _ in range(100):
            if fake.audiences["meta:aud-1"] >= ERIN_META:
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(erase_customer, runtime=ads_runtime, ref="erin", requested_by="test")
        for _ in range(100):
            if not list_removals(ads_runtime.engine):
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        report = await running
    assert list_removals(ads_runtime.engine) == [] and report.audience_removals == 2
    assert (
        not ERIN_META & fake.audiences["meta:aud-1"]
        and not ERIN_GOOGLE & fake.audiences[f"google:{USER_LIST}"]
    )


async def test_a_customer_merged_into_the_erased_one_leaves_the_audiences_too(
    ads_runtime: Runtime, fake: FakeProviders, http: httpx.AsyncClient
) -> None:
    """Olaf was merged into Erin after both were synced: erasing Erin removes both sets of hashes."""
    synced(ads_runtime)
    dispatcher = Dispatcher(engine=ads_runtime.engine, route=registry(ads_runtime, http).route)
    await dispatcher.drain()
    with ads_runtime.engine.begin() as conn:
        conn.execute(update(customers).where(customers.c.id == 2).values(merged_into=1))
    assert (
        erase_customer(runtime=ads_runtime, ref="erin", requested_by="test")["audience_removals_queued"] == 4
    )
    assert (await dispatcher.drain()).audience_removals == 4
    assert fake.audiences["meta:aud-1"] == set() and fake.audiences[f"google:{USER_LIST}"] == set()
