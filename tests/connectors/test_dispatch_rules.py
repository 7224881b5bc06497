"""The dispatcher keeps the campaign rules a held-back send could break: quiet hours, caps, spacing.

Every test runs on SQLite and PostgreSQL against the fake SendGrid on loopback. Without the
rules check (``Dispatcher(rules=None)``, as before) each of these sends would go out.
"""

from __future__ import annotations

import base64
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import Engine, select, update

from cadence.clock import FixedClock
from cadence.connectors import delivery
from cadence.connectors.delivery import Dispatcher
from cadence.connectors.dispatch_rules import Held, RulesCheck
from cadence.connectors.testing import FakeProviders, connector_config
from cadence.dsl.loader import load_source
from cadence.engine.campaign import CompiledRuleset
from cadence.engine.events import parse_call
from cadence.engine.identity import resolve_customer
from cadence.engine.ingest import record_events
from cadence.engine.loop import EngineLoop
from cadence.engine.sendqueue import enqueue_send
from cadence.plugins.manager import ConnectorRegistry, build_connectors, make_plugin_manager
from cadence.runtime import open_runtime
from cadence.settings import Settings
from cadence.store.schema.core import profiles
from cadence.store.schema.sends import sends

BERLIN = ZoneInfo("Europe/Berlin")

RULES = """
campaign night_defer "Deferred out of the night" {
    audience  true
    send      template "d-defer"
    channel   email
    quiet     21:00..08:00 in customer.timezone ?? "Europe/Berlin" then defer
}

campaign night_drop "Dropped in the night" {
    audience  true
    send      template "d-drop"
    channel   email
    quiet     21:00..08:00 in customer.timezone ?? "Europe/Berlin" then drop
}

campaign short "Ends tonight" {
    audience  true
    send      template "d-short"
    channel   email
    quiet     21:00..08:00 in customer.timezone ?? "Europe/Berlin" then defer
    ends      2026-03-29 00:00
}
"""

CAPS = """
settings {
    cap       1 per 1d calendar
}
"""

SPACING = """
settings {
    spacing   4h
}
"""


def ruleset(text: str) -> CompiledRuleset:
    loaded = load_source(text)
    assert loaded.ruleset is not None, loaded.diagnostics
    return loaded.ruleset


def at(text: str) -> int:
    """Epoch ms of a Berlin wall-clock time."""
    return int(datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp() * 1000)


def registry(fake: FakeProviders, http: httpx.AsyncClient, engine: Engine) -> ConnectorRegistry:
    settings = Settings(
        disable_plugin_autoload=True,
        connectors={"sendgrid": connector_config("sendgrid", fake.base_url)},
        _env_file=None,  # type: ignore[call-arg]
    )
    return build_connectors(settings, pm=make_plugin_manager(settings), engine=engine, client=http)


def customer(engine: Engine, name: str, *, timezone: str | None = None) -> int:
    """A customer made the way the API makes one: an identify through the engine loop."""
    settings = Settings(database_url=str(engine.url), disable_plugin_autoload=True, _env_file=None)  # type: ignore[call-arg]
    traits: dict[str, Any] = {"email": f"{name}@example.com"}
    if timezone:
        traits["timezone"] = timezone
    call = {"type": "identify", "userId": name, "traits": traits, "messageId": f"id-{name}"}
    record_events(engine=engine, batch=[parse_call(call, received_ms=int(time.time() * 1000))])
    EngineLoop(open_runtime(settings, engine=engine)).catch_up()
    with engine.connect() as conn:
        found = resolve_customer(conn, name)
    assert found is not None
    return found


def queue(engine: Engine, cid: int, campaign: str, due_ms: int, key: str | None = None) -> None:
    with engine.begin() as conn:
        enqueue_send(
            conn,
            key=key or f"{campaign}:{cid}:1",
            campaign=campaign,
            customer_id=cid,
            channel="email",
            due_ms=due_ms,
            now_ms=due_ms,
            queued_ms=due_ms,  # queued when decided, in the test's time (not a replay of the past)
            template=f"d-{campaign}",
            decision_id=f"dec-{campaign}-{cid}",
        )


def rows(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        found = conn.execute(
            select(
                sends.c.idempotency_key, sends.c.status, sends.c.due_ms, sends.c.attempts, sends.c.last_error
            )
        ).mappings()
        return {r["idempotency_key"]: dict(r) for r in found}


def dispatcher(
    fake: FakeProviders,
    http: httpx.AsyncClient,
    engine: Engine,
    clock: FixedClock,
    rules: CompiledRuleset | None,
) -> Dispatcher:
    return Dispatcher(
        engine=engine, route=registry(fake, http, engine).route, clock=clock, rules=lambda: rules
    )


async def test_a_send_held_into_the_night_waits_for_the_morning_across_the_dst_change(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """Due 20:30 on the night Berlin springs forward, held back (429, a dispatcher that was down)
    until 23:10: it waits for 08:00 summer time (06:00 UTC, not 07:00), is no attempt, and goes then."""
    cid = customer(db_engine, "ada")
    queue(db_engine, cid, "night_defer", at("2026-03-28T20:30"))
    clock = FixedClock(at("2026-03-28T23:10"))
    rules = ruleset(RULES)

    report = await dispatcher(fake, http, db_engine, clock, rules).drain()
    row = rows(db_engine)[f"night_defer:{cid}:1"]
    assert report.deferred == 1 and report.sent == 0 and not fake.delivered
    assert row["status"] == "queued" and row["attempts"] == 0
    assert row["due_ms"] == int(datetime(2026, 3, 29, 6, 0, tzinfo=UTC).timestamp() * 1000)
    assert row["last_error"].startswith("quiet:") and "deferred to 2026-03-29 08:00 CEST" in row["last_error"]

    clock.set(at("2026-03-29T07:59"))  # summer time now: still quiet
    assert (await dispatcher(fake, http, db_engine, clock, rules).drain()).claimed == 0
    clock.set(at("2026-03-29T08:00"))
    assert (await dispatcher(fake, http, db_engine, clock, rules).drain()).sent == 1
    assert list(fake.delivered) == [f"night_defer:{cid}:1"]
    assert rows(db_engine)[f"night_defer:{cid}:1"]["attempts"] == 1


async def test_quiet_hours_are_read_in_the_customers_zone(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """23:10 in Berlin is 17:10 in New York: the New Yorker's send goes, the Berliner's waits."""
    berliner = customer(db_engine, "ada")
    new_yorker = customer(db_engine, "bob", timezone="America/New_York")
    now = at("2026-03-28T23:10")
    queue(db_engine, berliner, "night_defer", now - 60_000)
    queue(db_engine, new_yorker, "night_defer", now - 60_000)
    report = await dispatcher(fake, http, db_engine, FixedClock(now), ruleset(RULES)).drain()
    assert (report.sent, report.deferred) == (1, 1)
    assert list(fake.delivered) == [f"night_defer:{new_yorker}:1"]


async def test_drop_campaigns_and_campaigns_that_end_first_do_not_wait(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    cid = customer(db_engine, "ada")
    now = at("2026-03-28T23:10")
    queue(db_engine, cid, "night_drop", now - 60_000)
    queue(db_engine, cid, "short", now - 60_000)
    queue(db_engine, cid, "gone", now - 60_000)  # not in the loaded rules: goes as before
    report = await dispatcher(fake, http, db_engine, FixedClock(now), ruleset(RULES)).drain()
    found = rows(db_engine)
    assert (report.sent, report.suppressed, report.expired) == (1, 1, 1)
    assert found[f"night_drop:{cid}:1"]["status"] == "suppressed"
    assert "then drop" in found[f"night_drop:{cid}:1"]["last_error"]
    assert found[f"short:{cid}:1"]["status"] == "expired"
    assert "after the campaign ends" in found[f"short:{cid}:1"]["last_error"]
    assert list(fake.delivered) == [f"gone:{cid}:1"]


FOLD = """
settings {
    timezone  "America/New_York"
}

campaign nightly "Quiet until the repeated hour" {
    audience  true
    send      template "d-nightly"
    channel   email
    quiet     00:00..01:30 then defer
}

campaign never "Quiet the whole day" {
    audience  true
    send      template "d-never"
    channel   email
    quiet     08:00..08:00 then defer
}
"""


async def test_a_send_held_in_the_second_pass_of_a_repeated_hour_waits_for_the_second_quiet_end(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """New York, 2026-11-01, quiet until 01:30: at the second 01:10 (EST) the send waits for 01:30 EST,
    a due time 20 minutes ahead (until session 24 it was re-queued every round for 01:30 EDT, 40 minutes
    in the past, with that reason); at 01:30 EST it goes."""
    cid = customer(db_engine, "ada", timezone="America/New_York")
    now = int(datetime(2026, 11, 1, 6, 10, tzinfo=UTC).timestamp() * 1000)  # 01:10 EST
    queue(db_engine, cid, "nightly", now - 60_000)
    clock = FixedClock(now)
    rules = ruleset(FOLD)
    # one round: a deferral into the past would be claimed again and again by drain()
    report = await dispatcher(fake, http, db_engine, clock, rules).dispatch_once()
    row = rows(db_engine)[f"nightly:{cid}:1"]
    assert report.deferred == 1 and not fake.delivered
    assert row["due_ms"] == now + 20 * 60_000 and "deferred to 2026-11-01 01:30 EST" in row["last_error"]
    clock.set(now + 20 * 60_000)
    assert (await dispatcher(fake, http, db_engine, clock, rules).drain()).sent == 1


async def test_a_send_of_a_campaign_quiet_the_whole_day_is_dropped_not_sent(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """``quiet 08:00..08:00`` covers the whole day (the linter's W505): a queued send never goes, and
    waiting would never end, so it is suppressed (until session 24 it went out at any hour)."""
    cid = customer(db_engine, "ada", timezone="America/New_York")
    now = int(datetime(2026, 12, 1, 15, 0, tzinfo=UTC).timestamp() * 1000)  # 10:00 in New York
    queue(db_engine, cid, "never", now - 60_000)
    report = await dispatcher(fake, http, db_engine, FixedClock(now), ruleset(FOLD)).drain()
    row = rows(db_engine)[f"never:{cid}:1"]
    assert report.suppressed == 1 and not fake.delivered and row["status"] == "suppressed"
    assert "quiet hours 08:00..08:00 America/New_York (the whole day)" in row["last_error"]


async def test_without_rules_the_night_send_goes_out(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """What happened before: the dispatcher knew no campaign rules."""
    cid = customer(db_engine, "ada")
    now = at("2026-03-28T23:10")
    queue(db_engine, cid, "night_defer", now - 60_000)
    assert (await dispatcher(fake, http, db_engine, FixedClock(now), None).drain()).sent == 1


async def test_a_provider_429_retry_that_lands_in_the_night_is_deferred_not_counted(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """A 429 at 20:59 with a long Retry-After re-queues the send for after 21:00; then it waits."""
    cid = customer(db_engine, "ada")
    clock = FixedClock(at("2026-03-28T20:59"))
    queue(db_engine, cid, "night_defer", clock.now_ms())
    fake.fail_next("sendgrid", 429, headers={"Retry-After": "120"})
    rules = ruleset(RULES)
    first = await dispatcher(fake, http, db_engine, clock, rules).dispatch_once()
    assert first.deferred == 1 and not fake.delivered
    clock.set(at("2026-03-28T21:02"))
    second = await dispatcher(fake, http, db_engine, clock, rules).drain()
    row = rows(db_engine)[f"night_defer:{cid}:1"]
    assert second.deferred == 1 and not fake.delivered
    assert row["status"] == "queued" and row["attempts"] == 0 and row["last_error"].startswith("quiet:")


async def merged_pair(engine: Engine, now: int) -> tuple[int, int]:
    """Two customers, each with an email send queued for today, then stitched by an alias."""
    settings = Settings(database_url=str(engine.url), disable_plugin_autoload=True, _env_file=None)  # type: ignore[call-arg]
    runtime = open_runtime(settings, engine=engine)
    calls = [
        {"type": "identify", "userId": "ada", "traits": {"email": "ada@example.com"}, "messageId": "i1"},
        {
            "type": "identify",
            "anonymousId": "anon-1",
            "traits": {"email": "ada@work.example"},
            "messageId": "i2",
        },
    ]
    record_events(engine=engine, batch=[parse_call(c, received_ms=int(time.time() * 1000)) for c in calls])
    loop = EngineLoop(runtime)
    loop.catch_up()
    with engine.connect() as conn:
        known, anonymous = resolve_customer(conn, "ada"), resolve_customer(conn, "anon-1")
    assert known is not None and anonymous is not None and known != anonymous
    queue(engine, known, "spring", now - 60_000)
    queue(engine, anonymous, "summer", now - 30_000)
    alias = {"type": "alias", "previousId": "anon-1", "userId": "ada", "messageId": "a1"}
    record_events(engine=engine, batch=[parse_call(alias, received_ms=int(time.time() * 1000))])
    loop.catch_up()
    with engine.connect() as conn:
        assert resolve_customer(conn, "anon-1") == known
        assert conn.scalar(select(profiles.c.customer_id).where(profiles.c.customer_id == anonymous)) is None
    return known, anonymous


async def test_merged_customers_keep_the_daily_cap(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """One send per local day: the merged customer gets the first, the second is suppressed as capped."""
    now = at("2026-03-04T12:00")
    known, anonymous = await merged_pair(db_engine, now)
    report = await dispatcher(fake, http, db_engine, FixedClock(now), ruleset(RULES + CAPS)).drain()
    found = rows(db_engine)
    assert (report.sent, report.suppressed) == (1, 1)
    assert list(fake.delivered) == [f"spring:{known}:1"]
    assert found[f"summer:{anonymous}:1"]["status"] == "suppressed"
    assert found[f"summer:{anonymous}:1"]["last_error"].startswith("cap:")
    # Later that day too, with the first one already sent (counted from the table, not the round).
    queue(db_engine, anonymous, "summer", at("2026-03-04T18:00"), key="summer:late")
    late = await dispatcher(fake, http, db_engine, FixedClock(at("2026-03-04T18:00")), ruleset(CAPS)).drain()
    assert late.suppressed == 1 and rows(db_engine)["summer:late"]["status"] == "suppressed"
    # The next local day it goes, to the merged customer's address.
    queue(db_engine, anonymous, "summer", at("2026-03-05T09:00"), key="summer:next")
    nxt = await dispatcher(fake, http, db_engine, FixedClock(at("2026-03-05T09:00")), ruleset(CAPS)).drain()
    assert nxt.sent == 1
    sent_to = [c.body["personalizations"][0]["to"][0]["email"] for c in fake.calls_to("sendgrid")]
    assert sent_to[-1] == "ada@work.example"  # the latest identify's email, now the merged customer's
    # That send is still the merged-away customer's row: it counts against the merged customer's own.
    queue(db_engine, known, "spring", at("2026-03-05T15:00"), key="spring:next")
    own = await dispatcher(fake, http, db_engine, FixedClock(at("2026-03-05T15:00")), ruleset(CAPS)).drain()
    assert own.suppressed == 1 and rows(db_engine)["spring:next"]["last_error"].startswith("cap:")


async def test_merged_customers_keep_the_spacing(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """4h spacing: the second send waits 4h after the first, still queued, no attempt counted."""
    now = at("2026-03-04T12:00")
    known, anonymous = await merged_pair(db_engine, now)
    clock = FixedClock(now)
    report = await dispatcher(fake, http, db_engine, clock, ruleset(SPACING)).drain()
    row = rows(db_engine)[f"summer:{anonymous}:1"]
    assert (report.sent, report.deferred) == (1, 1)
    assert row["status"] == "queued" and row["attempts"] == 0 and row["last_error"].startswith("spacing:")
    assert row["due_ms"] == now + 4 * 3_600_000
    clock.set(now + 4 * 3_600_000)
    assert (await dispatcher(fake, http, db_engine, clock, ruleset(SPACING)).drain()).sent == 1


async def test_a_merged_away_customers_send_goes_to_the_customer_they_became(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """Without rules the merged customer's sends both go, to the address the merge left (the
    merged-away customer's own profile is gone: before, its send failed with 'no email trait')."""
    now = at("2026-03-04T12:00")
    known, anonymous = await merged_pair(db_engine, now)
    report = await dispatcher(fake, http, db_engine, FixedClock(now), None).drain()
    assert report.sent == 2 and report.failed == 0
    bodies = [c.body["personalizations"] for c in fake.calls_to("sendgrid")]
    assert {p["custom_args"]["customer_id"] for b in bodies for p in b} == {str(known)}


async def test_a_requeued_dead_letter_at_night_waits(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """`cadence sends requeue` makes a send due now: at night it waits like any other."""
    from cadence.connectors.operator import requeue_sends

    cid = customer(db_engine, "ada")
    now = at("2026-03-28T23:10")
    queue(db_engine, cid, "night_defer", at("2026-03-28T10:00"))
    with db_engine.begin() as conn:
        conn.execute(update(sends).values(status="failed", last_error="ConfigError: no api key"))
    with db_engine.connect() as conn:
        send_id = conn.scalar(select(sends.c.id))
    assert requeue_sends(db_engine, ids=[send_id], now_ms=now).done == [send_id]
    report = await dispatcher(fake, http, db_engine, FixedClock(now), ruleset(RULES)).drain()
    assert report.deferred == 1 and not fake.delivered


def test_the_server_dispatcher_reads_the_rule_files(tmp_path: Any) -> None:
    """``cadence serve``'s dispatcher is given the rules, loaded from the rule files at need."""
    from cadence.api.routers.webhooks import dispatch_rules_of

    (tmp_path / "night.cadence").write_text(RULES)
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/cadence.db",
        rules_paths=[str(tmp_path)],
        disable_plugin_autoload=True,
        _env_file=None,  # type: ignore[call-arg]
    )
    runtime = open_runtime(settings, upgrade=True)
    try:
        found = dispatch_rules_of(runtime)
        assert found is not None and "night_defer" in found.campaigns
    finally:
        runtime.close()


async def test_an_operator_sees_why_a_send_waits(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """`cadence sends list --reason quiet:` and `GET /v1/sends?reason=quiet:` show the deferred send."""
    import orjson
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from cadence.api.app import create_app
    from cadence.api.security import create_key
    from cadence.cli import app
    from cadence.errors import IdentityError

    cid = customer(db_engine, "ada")
    now = at("2026-03-28T23:10")
    queue(db_engine, cid, "night_defer", now - 60_000)
    queue(db_engine, cid, "gone", now - 60_000)
    await dispatcher(fake, http, db_engine, FixedClock(now), ruleset(RULES)).drain()

    url = db_engine.url.render_as_string(hide_password=False)
    env = {"CADENCE_DATABASE_URL": url, "CADENCE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    listed = CliRunner().invoke(app, ["sends", "list", "--reason", "quiet:", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    (row,) = orjson.loads(listed.output)
    assert (row["campaign"], row["status"], row["attempts"]) == ("night_defer", "queued", 0)
    assert "deferred to 2026-03-29 08:00 CEST" in row["last_error"]
    table = CliRunner().invoke(app, ["sends", "list", "--status", "sent"], env=env)
    assert table.exit_code == 0 and "gone" in table.output and "night_defer" not in table.output
    # --customer takes the user id, as POST /v1/decisions does, or the customer number.
    for ref in ("ada", str(cid)):
        mine = CliRunner().invoke(app, ["sends", "list", "--customer", ref, "--json"], env=env)
        assert mine.exit_code == 0, mine.output
        assert sorted(r["campaign"] for r in orjson.loads(mine.output)) == ["gone", "night_defer"]
    nobody = CliRunner().invoke(app, ["sends", "list", "--customer", "nobody"], env=env)
    assert isinstance(nobody.exception, IdentityError) and "'nobody'" in str(nobody.exception)

    settings = Settings(database_url=url, disable_plugin_autoload=True, _env_file=None)  # type: ignore[call-arg]
    web = create_app(runtime=open_runtime(settings, engine=db_engine), background=False)
    key = create_key(db_engine, name="admin", scopes=["admin"])
    headers = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
    with TestClient(web) as client:
        answer = client.get(
            "/v1/sends", params={"reason": "quiet:", "campaign": "night_defer"}, headers=headers
        )
        assert answer.status_code == 200, answer.text
        assert [r["last_error"] for r in answer.json()["sends"]] == [row["last_error"]]
        assert (
            client.get("/v1/sends", params={"status": "sent"}, headers=headers).json()["sends"][0]["campaign"]
            == "gone"
        )


async def test_ad_audience_changes_are_neither_capped_nor_counted(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine
) -> None:
    """An audience sync's add is no message: the daily cap neither holds it nor counts it."""
    cid = customer(db_engine, "ada")
    now = at("2026-03-04T12:00")
    with db_engine.begin() as conn:
        enqueue_send(
            conn,
            key=f"retarget:{cid}:add",
            campaign="retarget",
            customer_id=cid,
            channel="email",  # routed like the message: what matters is the operation
            due_ms=now - 120_000,
            now_ms=now - 120_000,
            queued_ms=now - 120_000,
            template="d-retarget",
            variables={"operation": "add"},
        )
    queue(db_engine, cid, "spring", now - 60_000)
    report = await dispatcher(fake, http, db_engine, FixedClock(now), ruleset(CAPS)).drain()
    assert (report.sent, report.suppressed) == (2, 0)


class DefersIntoThePast(RulesCheck):
    """Quiet hours with session 24's repeated-hour bug: a deferral 40 minutes before now."""

    def _quiet(self, name: str, timezone: str | None) -> Held | None:
        held = super()._quiet(name, timezone)
        if held is None or held.status != "queued":
            return held
        return replace(held, due_ms=self.now - 40 * 60_000)


async def test_a_deferral_dated_before_now_waits_instead_of_being_claimed_every_round(
    fake: FakeProviders, http: httpx.AsyncClient, db_engine: Engine, monkeypatch: Any
) -> None:
    """No rule defers to the past now, but the repeated-hour bug did: the row stayed due, and
    drain() claimed and deferred it round after round until its budget ran out. Such a hold is
    checked again a minute later: one round defers it, still unsent, and drain() ends."""
    monkeypatch.setattr(delivery, "RulesCheck", DefersIntoThePast)
    cid = customer(db_engine, "ada")
    now = at("2026-03-28T23:10")
    queue(db_engine, cid, "night_defer", now - 60_000)
    clock = FixedClock(now)
    report = await dispatcher(fake, http, db_engine, clock, ruleset(RULES)).drain(max_rounds=20)
    row = rows(db_engine)[f"night_defer:{cid}:1"]
    assert (report.claimed, report.deferred, report.sent) == (1, 1, 0) and not fake.delivered
    assert (row["status"], row["due_ms"], row["attempts"]) == ("queued", now + 60_000, 0)
    assert row["last_error"].startswith("quiet:")
    clock.set(now + 60_000)  # checked again: still the night, still held
    assert (await dispatcher(fake, http, db_engine, clock, ruleset(RULES)).drain(max_rounds=20)).claimed == 1
