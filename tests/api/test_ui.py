"""The dashboard routes without a browser: who may see what, and what the pages say."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from cadence.api.app import create_app
from cadence.api.security import KeyRing, create_key, revoke_key
from cadence.api.ui_auth import SESSION_COOKIE
from cadence.clock import now_ms
from cadence.engine.assignments import holdout_lifts
from cadence.engine.decisions_service import make_decision
from cadence.runtime import Runtime
from cadence.sim.demo import demo_events
from cadence.store.schema.connectors import connector_state


def ms_to_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def people(
    prefix: str, n: int, *, at_ms: int | None = None, email: Callable[[int], bool] | None = None
) -> list[dict[str, Any]]:
    """Identify calls for users ``{prefix}0`` to ``{prefix}{n-1}`` in UTC, consenting to email (or as ``email(i)`` says)."""
    return [
        {
            "type": "identify",
            "userId": f"{prefix}{i}",
            "messageId": f"{prefix}{i}",
            "traits": {"timezone": "UTC", "consent": {"email": True if email is None else email(i)}},
            **({"timestamp": ms_to_iso(at_ms)} if at_ms is not None else {}),
        }
        for i in range(n)
    ]


RULES = Path(__file__).resolve().parents[2] / "rules"
PAGES = ("/ui/attribution", "/ui/campaigns", "/ui/decisions", "/ui/rules")


@pytest.fixture
def client(runtime: Runtime, tmp_path: Path) -> Iterator[TestClient]:
    """The app over a seeded database (demo events through the engine loop) and the example rules."""
    rules = tmp_path / "rules"
    shutil.copytree(RULES, rules)
    runtime.settings = runtime.settings.model_copy(update={"rules_paths": [rules]})
    app = create_app(runtime=runtime, background=False)
    # Revocations are seen at the key ring's next refresh; make that every request here.
    app.state.keyring = KeyRing(runtime.settings, runtime.engine, refresh_seconds=0)
    with TestClient(app) as c:
        ingest = api_key(runtime.engine, "ingest")
        calls = demo_events(now_ms=now_ms(), customers=30, days=10)
        stored = c.post("/v1/batch", json={"batch": calls}, headers=ingest)
        assert stored.status_code == 200, stored.text
        app.state.engine_loop.catch_up()
        yield c


def _login(client: TestClient, key: str) -> None:
    response = client.post("/ui/login", data={"key": key, "next": "/ui/rules"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/rules"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "Path=/ui" in cookie and "samesite=lax" in cookie.lower()
    assert key not in cookie  # the cookie holds a signed digest, never the key


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no csrf field on the page"
    return found.group(1)


def test_pages_need_a_key(client: TestClient) -> None:
    for page in PAGES:
        response = client.get(page, follow_redirects=False)
        assert response.status_code == 303, page
        assert response.headers["location"].startswith("/ui/login?next=")
    assert client.get("/ui/login").status_code == 200
    bad = client.post("/ui/login", data={"key": "cdk_wrong"}, follow_redirects=False)
    assert bad.status_code == 401 and "Unknown or revoked" in bad.text
    client.cookies.set(SESSION_COOKIE, "eyJkIjoiYSIsInQiOjF9.forged", path="/ui")
    forged = client.get("/ui/rules")
    assert forged.status_code == 401 and "session ended" in forged.text
    client.cookies.clear()
    assert (
        client.post("/ui/decisions/preview", data={"customer": "demo-1"}, follow_redirects=False).status_code
        == 303
    )


def test_login_shows_every_page_with_data_then_logout(client: TestClient) -> None:
    _login(client, create_key(client.app.state.runtime.engine, name="analyst", scopes=["ingest"]))
    attribution = client.get("/ui/attribution")
    assert attribution.status_code == 200
    assert "paid_search" in attribution.text and 'data-chart="chart-credit"' in attribution.text
    assert attribution.headers["referrer-policy"] == "no-referrer"
    campaigns = client.get("/ui/campaigns")
    assert campaigns.status_code == 200 and "welcome" in campaigns.text and "cart_rescue" in campaigns.text
    decisions = client.get("/ui/decisions", params={"customer": "demo-3"})
    assert decisions.status_code == 200 and "user: demo-3" in decisions.text and "signed_up" in decisions.text
    assert "need a login with a key holding the <code>decide</code> scope" in decisions.text
    assert "No customer with the id nobody" in client.get("/ui/decisions", params={"customer": "nobody"}).text
    rules = client.get("/ui/rules")
    assert rules.status_code == 200 and "campaign:newsletter" in rules.text and "winback" in rules.text
    assert client.get("/ui/static/chart.umd.min.js").status_code == 200

    out = client.post("/ui/logout", data={"csrf": _csrf(rules.text)}, follow_redirects=False)
    assert out.status_code == 303 and SESSION_COOKIE in out.headers["set-cookie"]
    assert client.get("/ui/rules", follow_redirects=False).status_code == 303


def test_read_only_links_work_until_the_key_is_revoked(client: TestClient) -> None:
    engine = client.app.state.runtime.engine
    key = create_key(engine, name="board-link", scopes=["admin"])
    page = client.get("/ui/campaigns", params={"key": key})
    assert page.status_code == 200 and "read-only link" in page.text
    assert f"/ui/rules?key={key}" in page.text  # navigation keeps the link's key
    # A link never previews, even with a key that could.
    decisions = client.get("/ui/decisions", params={"key": key, "customer": "demo-1"})
    assert 'action="/ui/decisions/preview"' not in decisions.text
    refused = client.post(f"/ui/decisions/preview?key={key}", data={"customer": "demo-1"})
    assert refused.status_code == 403
    assert revoke_key(engine, name="board-link") == 1
    gone = client.get("/ui/campaigns", params={"key": key})
    assert gone.status_code == 401 and "revoked" in gone.text


def test_revoking_a_key_ends_its_sessions(client: TestClient) -> None:
    engine = client.app.state.runtime.engine
    _login(client, create_key(engine, name="temp", scopes=["admin"]))
    assert client.get("/ui/attribution").status_code == 200
    revoke_key(engine, name="temp")
    assert client.get("/ui/attribution").status_code == 401


def test_preview_needs_the_decide_scope_and_a_form_token(client: TestClient) -> None:
    engine = client.app.state.runtime.engine
    _login(client, create_key(engine, name="reader", scopes=["ingest"]))
    page = client.get("/ui/decisions", params={"customer": "demo-2"})
    forbidden = client.post("/ui/decisions/preview", data={"customer": "demo-2", "csrf": _csrf(page.text)})
    assert forbidden.status_code == 403 and "lacks the &#39;decide&#39; scope" in forbidden.text

    _login(client, create_key(engine, name="decider", scopes=["decide"]))
    page = client.get("/ui/decisions", params={"customer": "demo-2"})
    assert client.post("/ui/decisions/preview", data={"customer": "demo-2", "csrf": "x"}).status_code == 403
    done = client.post(
        "/ui/decisions/preview",
        data={
            "customer": "demo-2",
            "csrf": _csrf(page.text),
            "at": "2026-03-02T10:00",
            "zone": "Europe/Berlin",
        },
    )
    assert done.status_code == 200
    action = re.search(r'id="preview-action">(\w+)<', done.text)
    assert action and action.group(1) in {"send", "none"}
    assert "2026-03-02" in done.text  # decided at the chosen time, not now
    bad_time = client.post(
        "/ui/decisions/preview", data={"customer": "demo-2", "csrf": _csrf(page.text), "at": "yesterday"}
    )
    assert "is not a date and time" in bad_time.text


def test_login_never_redirects_off_site(client: TestClient) -> None:
    key = create_key(client.app.state.runtime.engine, name="k", scopes=["ingest"])
    for target in ("https://evil.example/", "//evil.example/ui/", "/v1/rules"):
        response = client.post("/ui/login", data={"key": key, "next": target}, follow_redirects=False)
        assert response.headers["location"] == "/ui/attribution", target


PROMO = """
campaign promo "Spring promo" {
    send      template "promo_a"
    channel   email
    priority  5
    split     holdout 30%, promo_a 70%
}
"""


def api_key(engine: Engine, scope: str) -> dict[str, str]:
    """The header of a new key with ``scope`` alone."""
    return {"X-API-Key": create_key(engine, name=scope, scopes=[scope])}


def app_with_rules(runtime: Runtime, tmp_path: Path, **files: str) -> FastAPI:
    """An app serving ``files`` (name -> rule text) as its rules."""
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, text in files.items():
        (rules / f"{name}.cadence").write_text(text)
    runtime.settings = runtime.settings.model_copy(update={"rules_paths": [rules]})
    return create_app(runtime=runtime, background=False)


def test_committed_decisions_feed_the_pages(runtime: Runtime, tmp_path: Path) -> None:
    app = app_with_rules(runtime, tmp_path, promo=PROMO)
    with TestClient(app) as client:
        engine = runtime.engine
        ingest = api_key(engine, "ingest")
        now = now_ms()
        calls = demo_events(now_ms=now - 3_600_000, customers=40, days=5)
        assert client.post("/v1/batch", json={"batch": calls}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()
        ruleset = runtime.extensions["rules"].reload().raise_for_errors()
        held = treated = sent = held_buyers = treated_buyers = 0
        with engine.begin() as conn:
            for i in range(40):
                body = make_decision(
                    conn=conn,
                    ruleset=ruleset,
                    customer_ref=f"demo-{i}",
                    now_ms=now - 7_200_000,
                    available_channels=["email"],
                    learners=None,
                    mode="commit",
                )
                # The lift counts customers by the arm they were assigned (intent to treat),
                # sent or not: a few demo customers unsubscribed and are never sent.
                in_holdout = "promo" in body["explanation"]["holdout"]
                held += in_holdout
                treated += not in_holdout
                sent += body["action"] == "send"
                if i < 10:  # these buy after the decision, below
                    held_buyers += in_holdout
                    treated_buyers += not in_holdout
        assert held > 0 and treated > sent > 0
        # Conversions after the decisions: every demo customer with an index below 10 buys.
        orders = [
            {
                "type": "track",
                "event": "Order Completed",
                "userId": f"demo-{i}",
                "messageId": f"o{i}",
                "properties": {"revenue": 10},
            }
            for i in range(10)
        ]
        assert client.post("/v1/batch", json={"batch": orders}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()

        key = create_key(engine, name="viewer", scopes=["ingest"])
        campaigns = client.get("/ui/campaigns", params={"key": key}).text
        assert f"0 explored, {sent} exploited" in campaigns  # no learner: every send exploits
        assert '<td>holdout</td><td class="n">' + str(held) + "</td>" in campaigns
        attribution = client.get("/ui/attribution", params={"key": key}).text
        assert 'id="lifts"' in attribution and "<td>promo</td>" in attribution
        assert f'<td class="n">{treated}</td><td class="n">{held}</td>' in attribution
        rates = f'<td class="n">{100 * treated_buyers / treated:.1f}%</td><td class="n">{100 * held_buyers / held:.1f}%</td>'
        assert rates in attribution
        decisions = client.get("/ui/decisions", params={"key": key, "customer": "demo-0"}).text
        assert 'class="decision"' in decisions and "promo" in decisions


def test_rules_page_shows_an_open_circuit(client: TestClient) -> None:
    engine = client.app.state.runtime.engine
    with engine.begin() as conn:  # what the dispatcher records when a connector keeps failing
        conn.execute(
            connector_state.insert().values(
                connector="sendgrid",
                circuit="open",
                failures=5,
                open_until_ms=now_ms() + 30_000,
                last_error="401 unauthorized",
                updated_ms=now_ms(),
            )
        )
    page = client.get("/ui/rules", params={"key": create_key(engine, name="ops", scopes=["ingest"])}).text
    circuits = page[page.index('id="circuits"') :]
    assert '<td>sendgrid</td><td class="bad">open</td><td class="n">5</td>' in circuits
    assert "401 unauthorized" in circuits


def test_attribution_page_opens_on_the_first_block_of_the_rules(client: TestClient) -> None:
    # The example rules define the blocks fair_search and first_and_last and no "default":
    # the page opened on "default", which the engine loop never credits, so it was empty.
    key = create_key(client.app.state.runtime.engine, name="viewer", scopes=["ingest"])
    page = client.get("/ui/attribution", params={"key": key})
    assert page.status_code == 200
    assert "· fair_search ·" in page.text, re.findall(r"<h1>.*?</h1>", page.text)
    assert '<option value="first_and_last"' in page.text
    unknown = client.get("/ui/attribution", params={"key": key, "spec": "nope"}).text
    assert "unknown attribution block" in unknown and "fair_search" in unknown
    typo = client.get("/ui/attribution", params={"key": key, "model": "markof"}).text
    assert "unknown model &#39;markof&#39;" in typo


def test_date_ranges_at_the_calendars_ends_or_spanning_centuries_are_bounded(client: TestClient) -> None:
    # to=0001-01-01: the default start (29 days earlier) overflowed: 500. from=0001-01-01:
    # a chart point for each of 739,000 days, a 12 MB attribution page and 37 MB campaigns page.
    key = create_key(client.app.state.runtime.engine, name="viewer", scopes=["ingest"])
    for page in ("/ui/attribution", "/ui/campaigns"):
        early = client.get(page, params={"key": key, "to": "0001-01-01"})
        assert early.status_code == 200, (page, early.status_code)
        wide = client.get(page, params={"key": key, "from": "0001-01-01", "to": "2026-11-27"})
        assert wide.status_code == 200 and len(wide.text) < 2_000_000, (page, len(wide.text))
        assert 'name="from" value="2024-11-27"' in wide.text, page


def test_holdout_lift_counts_the_blocks_conversion_event(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lift table counted "Order Completed" whatever the shown block converts on.
    from datetime import date

    from cadence.api import ui_pages

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "signup.cadence").write_text(
        'event signed_up = "Signed Up"\n\nattribution signups "Sign-ups" {\n    conversion  signed_up\n}\n'
    )
    runtime.settings = runtime.settings.model_copy(update={"rules_paths": [rules]})
    seen: list[str] = []
    real = ui_pages.block_lifts

    def spy(conn: object, block: Any, **kw: object) -> object:
        seen.append(block.conversion_event)
        return real(conn, block, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ui_pages, "block_lifts", spy)
    page = ui_pages.attribution_page(
        runtime,
        spec=None,
        models=["last_touch"],
        window_days=30,
        since=date(2026, 1, 1),
        until=date(2026, 1, 31),
    )
    assert page["spec"] == "signups" and seen == ["Signed Up"]


RESCUE = """
campaign rescue "Rescue big carts" {
    trigger   on "Cart Abandoned" where event.value ?? 0 >= 50
    audience  count("Cart Abandoned") >= 0
    unless    "Order Completed" within 1h
    send      template "cart_reminder"
    channel   email
}
"""


def test_decisions_page_names_each_conditions_clause(runtime: Runtime, tmp_path: Path) -> None:
    # The explanation's conditions carry their clause ("stage"); the page showed every condition
    # alike, so "yes: "Order Completed" within 1h = False" read as if the purchase were required.
    app = app_with_rules(runtime, tmp_path, rescue=RESCUE)
    with TestClient(app) as client:
        engine = runtime.engine
        ingest = api_key(engine, "ingest")
        shopper = {
            "type": "identify",
            "userId": "shopper",
            "messageId": "s1",
            "traits": {"email": "s@example.com"},
        }
        assert client.post("/v1/batch", json={"batch": [shopper]}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()
        runtime.extensions["rules"].reload().raise_for_errors()
        decide = api_key(engine, "decide")
        body = {
            "customer_id": "shopper",
            "mode": "commit",
            "event": {"event": "Cart Abandoned", "properties": {"value": 80}},
        }
        decided = client.post("/v1/decisions", json=body, headers=decide)
        assert decided.status_code == 200 and decided.json()["action"] == "send", decided.text
        stages = [c["stage"] for c in decided.json()["explanation"]["conditions"]["rescue"]]
        assert set(stages) == {"where", "audience", "unless"}, stages

        page = client.get(
            "/ui/decisions",
            params={"key": create_key(engine, name="v", scopes=["ingest"]), "customer": "shopper"},
        )
        assert page.status_code == 200
        conditions = page.text[page.text.index('class="conditions"') :]
        for words, text in (
            ("trigger condition", "event.value ?? 0 &gt;= 50"),
            ("audience", "count(&#34;Cart Abandoned&#34;) &gt;= 0"),
            ("unless", "&#34;Order Completed&#34; within 1h"),
        ):
            assert re.search(
                rf'yes: <span class="pill clause" title="[^"]+">{words}</span> <code>{re.escape(text)}</code>',
                conditions,
            ), (words, conditions[:2000])


OFFER = """
campaign offer "Offer" {
    send      template "offer"
    channel   email
    cap       1 per 7d
    split     holdout 50%, main 50%
}
"""


def _lift_experiment(
    runtime: Runtime, tmp_path: Path, buys: Callable[[int, bool], list[int]]
) -> tuple[dict[str, Any], dict[int, bool], str]:
    """60 customers (10 without email consent) decided for the campaign ``offer`` once a day for 7 days.

    ``buys(i, held_out)`` gives the days (relative to the first decision) customer ``i``
    orders on, at 12:00 UTC (the decisions are at 10:00). Returns the page's lift row for
    ``offer``, each customer's arm (True: held out) and the attribution page's text.
    """
    app = app_with_rules(runtime, tmp_path, offer=OFFER)
    start = (now_ms() // 86_400_000 - 12) * 86_400_000
    with TestClient(app) as client:
        engine = runtime.engine
        ingest = api_key(engine, "ingest")
        decide = api_key(engine, "decide")
        runtime.extensions["rules"].reload().raise_for_errors()
        calls = people("h", 60, at_ms=start - 3 * 86_400_000, email=lambda i: i >= 10)
        assert client.post("/v1/batch", json={"batch": calls}, headers=ingest).status_code == 200
        held: dict[int, bool] = {}
        for day in range(7):
            at = ms_to_iso(start + day * 86_400_000 + 36_000_000)
            requests = [{"customer_id": f"h{i}", "at": at, "mode": "commit"} for i in range(60)]
            answer = client.post("/v1/decisions/batch", json={"requests": requests}, headers=decide)
            assert answer.status_code == 200, answer.text
            for i, d in enumerate(answer.json()["decisions"]):
                held.setdefault(i, "offer" in d["explanation"]["holdout"])
        orders = [
            {
                "type": "track",
                "event": "Order Completed",
                "userId": f"h{i}",
                "messageId": f"o{i}-{day}",
                "properties": {"revenue": 10},
                "timestamp": ms_to_iso(start + day * 86_400_000 + 43_200_000),
            }
            for i in range(60)
            for day in buys(i, held[i])
        ]
        if orders:
            assert client.post("/v1/batch", json={"batch": orders}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()
        with engine.connect() as conn:
            lifts = holdout_lifts(conn, since_ms=start - 86_400_000, until_ms=start + 10 * 86_400_000)
        key = create_key(engine, name="viewer", scopes=["ingest"])
        page = client.get("/ui/attribution", params={"key": key}).text
    (row,) = lifts
    return row, held, page


def test_holdout_lift_of_a_campaign_without_effect_contains_zero(runtime: Runtime, tmp_path: Path) -> None:
    # The outside checker's case: every customer orders once (day 3), whatever they were
    # sent. The page showed treated 31 (sends), held out 203 (decisions), 100% / 57.1%
    # (a customer "converted" when their last order was after the decision) and a
    # "significant" lift of 42.86%.
    row, held, page = _lift_experiment(runtime, tmp_path, lambda i, held_out: [3])
    n_held = sum(held.values())
    # Per customer, by assigned arm: those without consent (never sent) count in theirs.
    assert (row["treated"], row["held_out"]) == (60 - n_held, n_held)
    assert 0 < n_held < 60
    assert row["treated_rate"] == row["held_out_rate"] == 1.0
    # Every customer converted in both arms: the interval still has a width (a normal
    # approximation would give 0 to 0, as certain as a lift can look).
    assert row["low"] < -0.05 and row["high"] > 0.05 and row["incremental"] == 0.0
    assert f'<td>offer</td><td class="n">{60 - n_held}</td><td class="n">{n_held}</td>' in page
    assert "Customers by the arm they were assigned" in page


def test_holdout_lift_shows_a_real_effect(runtime: Runtime, tmp_path: Path) -> None:
    # Half the treated arm orders after the first decision (day 2); the held-out customers
    # order only before it (day -2), which does not count, and so do the treated ones
    # without consent (never sent).
    def buys(i: int, held_out: bool) -> list[int]:
        return [-2] if held_out or i < 10 else ([-2, 2] if i % 2 else [-2])

    row, held, _page = _lift_experiment(runtime, tmp_path, buys)
    treated = [i for i in range(60) if not held[i]]
    buyers = [i for i in treated if i >= 10 and i % 2]
    assert (row["treated"], row["held_out"]) == (len(treated), 60 - len(treated))
    assert row["treated_rate"] == pytest.approx(len(buyers) / len(treated))
    assert row["held_out_rate"] == 0.0
    assert row["low"] > 0.0 and row["incremental"] == pytest.approx(len(buyers))
    # Read from the block's conversion history (above); customers assigned before the history's
    # reach are read from their day buckets: without the history, the same answer.

    with runtime.engine.begin() as conn:
        (first,) = conn.exec_driver_sql("SELECT MIN(first_ms) FROM arm_assignments").one()
        since, until = first - 36_000_000 - 86_400_000, first - 36_000_000 + 10 * 86_400_000
        assert [r["campaign"] for r in holdout_lifts(conn, since_ms=since, until_ms=until)] == ["offer"]
        assert holdout_lifts(conn, since_ms=since, until_ms=until)[0] == row
        assert conn.exec_driver_sql("DELETE FROM attribution_history WHERE spec = 'default'").rowcount > 0
        assert holdout_lifts(conn, since_ms=since, until_ms=until)[0] == row


def test_the_lift_is_served_by_the_api_and_the_cli_as_the_page_shows_it(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import timedelta

    from typer.testing import CliRunner

    from cadence.cli import app as cli
    from cadence.cli import main

    row, _held, _page = _lift_experiment(runtime, tmp_path, lambda i, held_out: [] if held_out else [2])
    with runtime.engine.connect() as conn:
        (first,) = conn.exec_driver_sql("SELECT MIN(first_ms) FROM arm_assignments").one()
    start = datetime.fromtimestamp(first / 1000, tz=UTC).date()
    since, until = str(start - timedelta(days=1)), str(start + timedelta(days=9))
    app = create_app(runtime=runtime, background=False)
    with TestClient(app) as client:
        admin = {"X-API-Key": create_key(runtime.engine, name="analyst", scopes=["admin"])}
        answer = client.get("/v1/attribution/lift", params={"from": since, "to": until}, headers=admin)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["spec"], body["conversion_event"], body["lifts"]) == (
            "default",
            "Order Completed",
            [row],
        )
        wrong = client.get("/v1/attribution/lift", params={"from": until, "to": since}, headers=admin)
        assert wrong.status_code == 422 and "is after" in wrong.json()["detail"]
        unknown = client.get("/v1/attribution/lift", params={"spec": "nope"}, headers=admin)
        assert unknown.status_code == 422 and "unknown attribution block 'nope'" in unknown.json()["detail"]
        # Outside the range the customers entered in, nobody.
        later = client.get(
            "/v1/attribution/lift", params={"from": str(start + timedelta(days=1))}, headers=admin
        )
        assert later.status_code == 200 and later.json()["lifts"] == []
    monkeypatch.setenv("CADENCE_DATABASE_URL", runtime.engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("CADENCE_RULES_PATHS", orjson.dumps([str(tmp_path / "rules")]).decode())
    runner = CliRunner()
    printed = runner.invoke(cli, ["attribution", "lift", "--from", since, "--to", until, "--json"])
    assert printed.exit_code == 0, printed.output
    assert orjson.loads(printed.output)["lifts"] == [row]
    table = runner.invoke(cli, ["attribution", "lift", "--from", since, "--to", until])
    assert table.exit_code == 0 and "offer" in table.output and f"{row['treated']:,}" in table.output
    with pytest.raises(SystemExit) as bad:  # as the shell runs it: the error said on stderr, exit 2
        main(["attribution", "lift", "--from", "yesterday"])
    assert bad.value.code == 2 and "--from 'yesterday': not a date (YYYY-MM-DD)" in capsys.readouterr().err


def test_conversions_count_from_the_first_assignment_to_the_ranges_end(
    runtime: Runtime, tmp_path: Path
) -> None:
    # The day of the assignment is split at its time: from the last conversion when that is
    # on the day, else from the customer's events.
    from cadence.engine.assignments import converted_after
    from cadence.engine.identity import customer_by_ref

    day = now_ms() // 86_400_000 - 20
    t = day * 86_400_000 + 36_000_000  # 10:00 on that day
    at = {"early": 32_400_000, "late": 43_200_000, "next": 86_400_000 + 43_200_000, "after": 9 * 86_400_000}
    orders = {
        "a": ["early"],  # before the assignment only: no
        "b": ["late"],  # after it, the same day: yes
        "c": ["early", "after"],  # before it, and after the range: no (read from the events)
        "d": ["late", "after"],  # yes (read from the events)
        "e": ["next"],  # the next day: yes
        "f": ["after"],  # after the range only: no
    }
    calls = [
        {
            "type": "track",
            "event": "Order Completed",
            "userId": name,
            "messageId": f"{name}-{when}",
            "timestamp": ms_to_iso(day * 86_400_000 + at[when]),
        }
        for name, whens in orders.items()
        for when in whens
    ]
    app = app_with_rules(runtime, tmp_path, offer=OFFER)
    with TestClient(app) as client:
        ingest = api_key(runtime.engine, "ingest")
        assert client.post("/v1/batch", json={"batch": calls}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()
    with runtime.engine.connect() as conn:
        ids = {name: customer_by_ref(conn, name) for name in orders}
        got = converted_after(
            conn,
            {(cid, t) for cid in ids.values()},
            until_ms=(day + 5) * 86_400_000,
            conversion_event="Order Completed",
        )
    assert sorted(name for name, cid in ids.items() if (cid, t) in got) == ["b", "d", "e"]


GATED = """
campaign gated "Gated" {
    send      template "gated"
    channel   email
    audience  count("Page Viewed") >= 1
    split     holdout 50%, main 50%
}
"""


def test_holdout_lift_starts_at_the_decision_that_drew_the_arm(runtime: Runtime, tmp_path: Path) -> None:
    # Out of the audience on day 0, nobody draws an arm; everyone views a page and orders on
    # day 1, then is decided for (and assigned) on day 2: the orders came before their
    # assignment and count for no arm.

    app = app_with_rules(runtime, tmp_path, gated=GATED)
    start = (now_ms() // 86_400_000 - 12) * 86_400_000
    with TestClient(app) as client:
        engine = runtime.engine
        ingest = api_key(engine, "ingest")
        decide = api_key(engine, "decide")
        runtime.extensions["rules"].reload().raise_for_errors()

        def track(event: str, i: int, ms: int) -> dict[str, Any]:
            return {
                "type": "track",
                "event": event,
                "userId": f"g{i}",
                "messageId": f"{event}{i}",
                "timestamp": ms_to_iso(ms),
            }

        people = [
            {
                "type": "identify",
                "userId": f"g{i}",
                "messageId": f"g{i}",
                "traits": {"consent": {"email": True}},
            }
            for i in range(40)
        ]
        assert client.post("/v1/batch", json={"batch": people}, headers=ingest).status_code == 200
        held = {}
        for day in (0, 2):
            if day == 2:
                later = [track("Page Viewed", i, start + 86_400_000) for i in range(40)]
                later += [track("Order Completed", i, start + 86_400_000 + 3_600_000) for i in range(40)]
                assert client.post("/v1/batch", json={"batch": later}, headers=ingest).status_code == 200
                app.state.engine_loop.catch_up()
            at = ms_to_iso(start + day * 86_400_000 + 36_000_000)
            requests = [{"customer_id": f"g{i}", "at": at, "mode": "commit"} for i in range(40)]
            answer = client.post("/v1/decisions/batch", json={"requests": requests}, headers=decide)
            assert answer.status_code == 200, answer.text
            for i, d in enumerate(answer.json()["decisions"]):
                if day == 0:
                    assert [s["reason"] for s in d["explanation"]["suppressions"]] == ["audience"]
                held[i] = "gated" in d["explanation"]["holdout"]
        with engine.connect() as conn:
            (row,) = holdout_lifts(conn, since_ms=start - 86_400_000, until_ms=start + 10 * 86_400_000)
        key = create_key(engine, name="viewer", scopes=["ingest"])
        page = client.get("/ui/attribution", params={"key": key}).text
    n_held = sum(held.values())
    assert (row["treated"], row["held_out"]) == (40 - n_held, n_held)
    assert row["treated_rate"] == row["held_out_rate"] == 0.0
    # The page knows the campaign has a holdout arm from the rules.
    cells = (
        f'<td>gated</td><td class="n">{40 - n_held}</td><td class="n">{n_held}</td><td class="n">0.0%</td>'
    )
    assert cells in page


def test_holdout_lift_counts_each_customer_in_the_range_they_entered(
    runtime: Runtime, tmp_path: Path
) -> None:
    # A customer belongs to the cohort of their first assignment ever: decided on day 6 and
    # then on day 1 (an ``at`` before the first commit), they entered on day 1, and a range
    # starting on day 3 has nobody in it.
    from cadence.store.schema.decisions import arm_assignments

    app = app_with_rules(runtime, tmp_path, offer=OFFER)
    start = (now_ms() // 86_400_000 - 12) * 86_400_000
    with TestClient(app) as client:
        engine = runtime.engine
        ingest = api_key(engine, "ingest")
        decide = api_key(engine, "decide")
        runtime.extensions["rules"].reload().raise_for_errors()
        calls = people("k", 30, at_ms=start - 86_400_000)
        assert client.post("/v1/batch", json={"batch": calls}, headers=ingest).status_code == 200
        for day in (6, 1):
            at = ms_to_iso(start + day * 86_400_000 + 36_000_000)
            requests = [{"customer_id": f"k{i}", "at": at, "mode": "commit"} for i in range(30)]
            answer = client.post("/v1/decisions/batch", json={"requests": requests}, headers=decide)
            assert answer.status_code == 200, answer.text
        with engine.connect() as conn:
            firsts = {r.first_ms for r in conn.execute(arm_assignments.select())}
            whole = holdout_lifts(conn, since_ms=start, until_ms=start + 10 * 86_400_000)
            later = holdout_lifts(conn, since_ms=start + 3 * 86_400_000, until_ms=start + 10 * 86_400_000)
    assert firsts == {start + 86_400_000 + 36_000_000}
    assert [r["treated"] + r["held_out"] for r in whole] == [30]
    assert later == []


def test_the_decision_mix_reads_its_columns_as_the_explanations_say(runtime: Runtime, tmp_path: Path) -> None:
    # The mix is counted from two columns written with each decision; decisions recorded
    # before them are read from their explanations. Both must give the same numbers.
    from cadence.api.ui_pages import decision_mix
    from cadence.store.schema.decisions import decisions

    app = app_with_rules(runtime, tmp_path, promo=PROMO, offer=OFFER)
    now = now_ms()
    with TestClient(app) as client:
        engine = runtime.engine
        ingest = api_key(engine, "ingest")
        decide = api_key(engine, "decide")
        calls = demo_events(now_ms=now - 3_600_000, customers=40, days=5)
        assert client.post("/v1/batch", json={"batch": calls}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()
        runtime.extensions["rules"].reload().raise_for_errors()
        requests = [{"customer_id": f"demo-{i}", "mode": "commit"} for i in range(40)]
        for _ in range(2):  # the second round is capped: suppressions of several reasons
            answer = client.post("/v1/decisions/batch", json={"requests": requests}, headers=decide)
            assert answer.status_code == 200, answer.text
        with engine.connect() as conn:
            stored = [(r.action, r.explored, r.suppressed) for r in conn.execute(decisions.select())]
            fresh = decision_mix(conn, since_ms=now - 86_400_000, until_ms=now + 86_400_000)
        with engine.begin() as conn:
            conn.execute(decisions.update().values(explored=None, suppressed=None))
        with engine.connect() as conn:
            legacy = decision_mix(conn, since_ms=now - 86_400_000, until_ms=now + 86_400_000)
    assert all(s is not None for _a, _e, s in stored) and len(stored) == 80
    assert fresh == legacy
    assert fresh["decisions"] == 80 and fresh["sends"] == sum(a == "send" for a, _e, _s in stored) > 0
    assert {"holdout", "cap"} <= set(fresh["suppressions"])


def test_a_decision_row_says_whether_its_chosen_candidate_was_explored() -> None:
    from cadence.engine.decision import Candidate, Decision, Suppression
    from cadence.engine.decisions_service import INSERT_DECISION, decision_row

    columns = INSERT_DECISION.split("(", 1)[1].split(")", 1)[0].replace(" ", "").split(",")
    other = Candidate("promo", "sms", 1_000, 0.9, explored=False)
    chosen = Candidate("promo", "email", 2_000, 0.2, explored=True)
    capped = Suppression("offer", "cap", "1 per 7d reached")
    for explored in (True, False):
        decision = Decision(
            action="send",
            ruleset_hash="h",
            customer_id=1,
            decided_at_ms=0,
            campaign="promo",
            channel="email",
            send_at_ms=2_000,
            candidates=(other, Candidate("promo", "email", 2_000, 0.2, explored=explored)),
            suppressions=(capped, Suppression("promo", "quiet", "22:00..08:00")),
        )
        row = dict(zip(columns, decision_row("d", 1, 0, decision, "{}", "{}", None), strict=True))
        assert (row["explored"], row["suppressed"]) == (explored, "cap quiet")
    nothing = Decision(action="none", ruleset_hash="h", customer_id=1, decided_at_ms=0, candidates=(chosen,))
    row = dict(zip(columns, decision_row("d", 1, 0, nothing, "{}", "{}", None), strict=True))
    assert (row["explored"], row["suppressed"]) == (False, "")


def test_a_merged_visitors_assignment_goes_with_them(runtime: Runtime, tmp_path: Path) -> None:
    # Decided for as an anonymous visitor, then identified: the earliest assignment, with its
    # arm, belongs to the customer the visitor joined, whose conversions the lift reads.
    from cadence.store.schema.core import customers
    from cadence.store.schema.decisions import arm_assignments

    app = app_with_rules(runtime, tmp_path, promo=PROMO)
    now = now_ms()
    N = 24
    with TestClient(app) as client:
        engine = runtime.engine
        ingest = api_key(engine, "ingest")
        decide = api_key(engine, "decide")
        runtime.extensions["rules"].reload().raise_for_errors()
        # The users first: the older customer is the one a merge keeps, so the visitors' arms must
        # outlive their own ids (the hash of the user's id may draw the other arm).
        visits = [{"type": "identify", "userId": f"user-{i}", "messageId": f"u{i}"} for i in range(N)] + [
            {"type": "track", "event": "Page Viewed", "anonymousId": f"anon-{i}", "messageId": f"v{i}"}
            for i in range(N)
        ]
        assert client.post("/v1/batch", json={"batch": visits}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()
        for ref, at in (("anon", now - 7_200_000), ("user", now - 3_600_000)):
            requests = [
                {"customer_id": f"{ref}-{i}", "at": ms_to_iso(at), "mode": "commit"} for i in range(N)
            ]
            answer = client.post("/v1/decisions/batch", json={"requests": requests}, headers=decide)
            assert answer.status_code == 200, answer.text
        with engine.connect() as conn:
            before = {(r.customer_id, r.first_ms, r.held) for r in conn.execute(arm_assignments.select())}
        joins = [
            {"type": "identify", "userId": f"user-{i}", "anonymousId": f"anon-{i}", "messageId": f"j{i}"}
            for i in range(N)
        ]
        assert client.post("/v1/batch", json={"batch": joins}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()
        with engine.connect() as conn:
            after = {(r.customer_id, r.first_ms, r.held) for r in conn.execute(arm_assignments.select())}
            merged = dict(
                conn.execute(
                    customers.select().with_only_columns(customers.c.id, customers.c.merged_into)
                ).all()
            )
    assert len(before) == 2 * N
    first = {(c, ms, held) for c, ms, held in before if ms == now - 7_200_000}
    assert len(after) == N
    assert after == {(merged[c] if merged[c] is not None else c, ms, held) for c, ms, held in first}
    assert all(merged[c] is None for c, _ms, _held in after)
    # Decided again after the merge, each keeps the arm they were first assigned, whatever the
    # hash of the id they joined draws: a visitor held out is never sent the campaign.
    arm_of = {c: held for c, _ms, held in after}
    with TestClient(app) as client:
        requests = [{"customer_id": f"user-{i}", "mode": "commit"} for i in range(N)]
        answer = client.post("/v1/decisions/batch", json={"requests": requests}, headers=decide)
        assert answer.status_code == 200, answer.text
    decided = answer.json()["decisions"]
    assert {d["customer_id"]: "promo" in d["explanation"]["holdout"] for d in decided} == arm_of
    assert not any(d["campaign"] == "promo" for d in decided if arm_of[d["customer_id"]])
    assert any(d["campaign"] == "promo" for d in decided if not arm_of[d["customer_id"]])
    # An erasure takes the customer's assignment with it: no lift counts them any longer.
    with TestClient(app) as client:
        admin = {"X-API-Key": create_key(runtime.engine, name="dpo", scopes=["admin"])}
        assert client.delete("/v1/customers/user-0", headers=admin).status_code == 200
    with engine.connect() as conn:
        left = {r.customer_id for r in conn.execute(arm_assignments.select())}
    assert len(left) == N - 1 and left < {c for c, _ms, _held in after}


def test_a_recorded_decision_reads_back_in_the_zone_it_was_decided_in(
    runtime: Runtime, tmp_path: Path
) -> None:
    # A customer without a zone is decided in the ruleset's zone; reading the decision back gave
    # its times in UTC (the server's default), beside a summary in the ruleset's zone.
    rules = 'settings {\n    timezone  "Europe/Berlin"\n}\n\ncampaign hello "Hello" {\n    send  template "hello"\n    channel  email\n}\n'
    app = app_with_rules(runtime, tmp_path, hello=rules)
    with TestClient(app) as client:
        ingest = api_key(runtime.engine, "ingest")
        decide = api_key(runtime.engine, "decide")
        runtime.extensions["rules"].reload().raise_for_errors()
        nobody = {
            "type": "identify",
            "userId": "z1",
            "messageId": "z1",
            "traits": {"consent": {"email": True}},
        }
        assert client.post("/v1/batch", json={"batch": [nobody]}, headers=ingest).status_code == 200
        app.state.engine_loop.catch_up()
        body = {"customer_id": "z1", "at": "2026-07-01T08:00:00Z", "mode": "commit"}
        posted = client.post("/v1/decisions", json=body, headers=decide).json()
        read = client.get(f"/v1/decisions/{posted['decision_id']}", headers=decide).json()
    assert posted["action"] == "send" and posted["send_at"].endswith("+02:00")  # the learners pick the hour
    assert (read["send_at"], read["decided_at"]) == (posted["send_at"], "2026-07-01T10:00:00+02:00")
